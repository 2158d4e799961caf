"""What `python -m training.eval` reads: the run folder (checkpoint, train_config.json, the run's
images and templates) and the ground truth (a CSV, a folder per domain, or the Twemoji names), plus
the names of the files it reads and writes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lanit_rt.checkpoint import LanitModel, OutputPathError, check_output_file, load_checkpoint
from training.data import DataError, check_images, find_images
from training.run_folder import TRAIN_CONFIG_FILE, read_train_config, recorded_path_candidates, run_origin

METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "pseudo_labels.csv"
PROMPTS_FILE = "prompts.safetensors"
OUTPUT_FILES = ("eval.json", "eval.md", "eval_samples.png", "eval_curves.png")
MODES = ("adaptive", "topk", "threshold")


class EvalError(ValueError):
    """The run folder or the ground truth cannot be evaluated."""


# ----------------------------------------------------------------------------- the run folder

@dataclass
class RunInfo:
    run_dir: Path
    train_config: dict[str, Any]
    model: LanitModel
    paths: list[Path]
    templates: list[str] | None
    default_data: bool
    data_dir: Path | None = None  # the image folder in use (None: the embedded default data)
    origin: Path | None = None  # the folder the run was started from, when it can be told


def resolve_data_dir(data: str, run_dir: Path, origin: Path | None) -> Path:
    """The run's training-image folder. train_config.json keeps --data as it was given, so a
    relative path is tried from the folder the run was started in, then from the current folder,
    then from each folder above the run folder (the filesystem root excluded)."""
    candidates = recorded_path_candidates(data, run_dir, origin)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise EvalError(f"the run's data folder {data!r} (train_config.json) was not found; tried {tried}. "
                    f"Pass the folder with --data")


def check_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device that this machine has; EvalError otherwise (before anything loads)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise EvalError(f"--device {name}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def check_output_folder(folder: Path, what: str = "the run folder") -> None:
    """The eval files must be writable in `folder`: checked before any work, not at the last write."""
    for name in OUTPUT_FILES:
        try:
            check_output_file(folder / name)
        except OutputPathError as err:
            raise EvalError(f"cannot write the evaluation into {what}: {err}") from None


def read_run(run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True,
             data: str | Path | None = None, out_dir: str | Path | None = None) -> RunInfo:
    """Load the checkpoint and resolve the run's training images (as the trainer did). `data`
    replaces the image folder recorded in train_config.json (moved data, another working folder);
    `out_dir` is where the evaluation will be written (default: the run folder), checked first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} does not exist")
    cfg_file = run_dir / TRAIN_CONFIG_FILE
    if not cfg_file.exists():
        raise EvalError(f"{run_dir} has no {TRAIN_CONFIG_FILE}; is it a `python -m training.run` folder?")
    train_config = read_train_config(cfg_file)
    if out_dir is None:
        check_output_folder(run_dir)
    else:
        check_output_folder(Path(out_dir), f"--out {out_dir}")
    model = load_checkpoint(run_dir, device)
    cfg_domains = train_config.get("domains")
    if cfg_domains is not None and tuple(cfg_domains) != model.config.domains:
        raise EvalError(f"{cfg_file} domains {cfg_domains} differ from the checkpoint's "
                        f"{list(model.config.domains)}")
    origin = run_origin(run_dir, train_config.get("out"))
    recorded = train_config.get("data")
    if data is not None:
        data_dir = Path(data).expanduser()
    elif recorded is not None:
        data_dir = resolve_data_dir(str(recorded), run_dir, origin)
    else:
        data_dir = None
    if data_dir is None:
        from training.labeling.emoji import default_dataset

        paths, _ = default_dataset()
    else:
        paths = find_images(data_dir)
    paths = check_images(paths, progress=progress).paths
    trained_on = train_config.get("num_images")
    if data is not None and isinstance(trained_on, int) and trained_on != len(paths):
        warnings.warn(f"--data {data} holds {len(paths)} readable images, the run trained on "
                      f"{trained_on}: its pseudo-labels and figures describe other images", stacklevel=2)
    templates = train_config.get("templates")
    return RunInfo(run_dir, train_config, model, list(paths), templates, data_dir is None,
                   data_dir=data_dir, origin=origin)


def resolve_templates(run: RunInfo) -> list[str]:
    """The prompt templates the run used: stored in train_config.json, else resolved like the trainer."""
    if run.templates:
        return list(run.templates)
    from training.train import read_templates

    cfg = train_config_object(run.train_config)
    return read_templates(cfg, cfg.template_rule)


def train_config_object(data: dict[str, Any]):
    from training.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known})


def default_cache_dir(run: RunInfo) -> Path:
    from training.train import cache_root

    root = cache_root(train_config_object(run.train_config)).expanduser()
    if not root.is_absolute() and run.origin is not None:  # a relative cache_dir as it was given
        root = run.origin / root
    return root / "features"


# ----------------------------------------------------------------------------- ground truth

@dataclass
class GroundTruth:
    labels: torch.Tensor  # [N, D] 0/1 over the run's domains, rows in the run's image order
    known: list[bool]  # per domain: does the ground truth say anything about it?
    source: str

    @property
    def known_domains(self) -> list[int]:
        return [k for k, ok in enumerate(self.known) if ok]


def _match_rows(paths: Sequence[Path], table: dict[str, set[str]], origin: str) -> list[set[str]]:
    """Look each image up by resolved path, then by file name (names must then be unique)."""
    by_path = {str(Path(p).resolve()): v for p, v in table.items()}
    by_name: dict[str, set[str] | None] = {}
    for p, v in table.items():
        name = Path(p).name
        # None marks an ambiguous file name: one name with different labels
        by_name[name] = v if name not in by_name or by_name[name] == v else None
    rows, missing = [], []
    for path in paths:
        found = by_path.get(str(Path(path).resolve()))
        if found is None:
            found = by_name.get(Path(path).name)
        if found is None:
            missing.append(path)
            found = set()
        rows.append(found)
    if len(missing) == len(paths):
        raise EvalError(f"ground truth {origin} names none of the run's {len(paths)} images "
                        f"(e.g. {paths[0]})")
    if missing:
        raise EvalError(f"ground truth {origin} misses {len(missing)} of the run's images, "
                        f"e.g. {missing[0]}")
    return rows


def read_ground_truth(gt: str | Path, paths: Sequence[Path], domains: Sequence[str]) -> GroundTruth:
    """A CSV (path + 0/1 domain columns, or path + ';'-separated `domains`) or a folder per domain."""
    gt = Path(gt)
    if gt.is_dir():
        table: dict[str, set[str]] = {}
        vocabulary = set()
        for sub in sorted(p for p in gt.iterdir() if p.is_dir() and not p.name.startswith(".")):
            domain = sub.name.replace("_", " ")
            vocabulary.add(domain)
            try:
                images = find_images(sub)
            except DataError:  # an empty domain folder: no image has that domain
                images = []
            for image in images:
                table.setdefault(str(image), set()).add(domain)
        if not table:
            raise EvalError(f"ground-truth folder {gt} has no domain sub-folder with images")
        _merge_copies(table)
    elif gt.is_file():
        table, vocabulary = _read_gt_csv(gt)
    else:
        raise EvalError(f"ground truth {gt} does not exist")
    if not any(d in vocabulary for d in domains):
        raise EvalError(f"the ground truth {gt} names the domains {sorted(vocabulary)}, none of the "
                        f"run's {list(domains)}")
    rows = _match_rows(paths, table, str(gt))
    labels = torch.tensor([[1.0 if d in row else 0.0 for d in domains] for row in rows])
    return GroundTruth(labels, [d in vocabulary for d in domains], str(gt))


def _merge_copies(table: dict[str, set[str]]) -> None:
    """In a folder-per-domain ground truth, an image that has several domains sits, copied, in each
    of their folders: files of one name and the same bytes get the union of their domains (files
    of one name and other bytes are different images, told apart by path only)."""
    by_name: dict[str, list[str]] = {}
    for path in table:
        by_name.setdefault(Path(path).name, []).append(path)
    for copies in (group for group in by_name.values() if len(group) > 1):
        contents: dict[str, list[str]] = {}
        for path in copies:
            contents.setdefault(hashlib.sha256(Path(path).read_bytes()).hexdigest(), []).append(path)
        for same in contents.values():
            union = set().union(*(table[path] for path in same))
            for path in same:
                table[path] = union


def _read_gt_csv(file: Path) -> tuple[dict[str, set[str]], set[str]]:
    # utf-8-sig: spreadsheet programs start a "CSV UTF-8" file with a byte-order mark
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [name.strip() for name in reader.fieldnames or []]  # "path, blond hair"
            reader.fieldnames = fields
            if "path" not in fields:
                raise EvalError(f"{file}: a ground-truth CSV needs a 'path' column, got {fields}")
            rows = list(reader)
    except UnicodeDecodeError as err:  # a spreadsheet's own code page, say
        raise EvalError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); save it as "
                        "CSV UTF-8") from None
    base = file.parent
    table: dict[str, set[str]] = {}
    if fields == ["path", "domains"]:
        vocabulary: set[str] = set()
        for row in rows:
            names = {d.strip() for d in (row["domains"] or "").split(";") if d.strip()}
            vocabulary |= names
            table[_csv_path(row["path"], base)] = names
        return table, vocabulary
    columns = [c for c in fields if c != "path"]
    for line, row in enumerate(rows, start=2):
        names = set()
        for c in columns:
            value = (row[c] or "").strip()
            if value not in ("0", "1", "0.0", "1.0"):
                raise EvalError(f"{file}:{line}: column {c!r} must be 0 or 1, got {value!r}")
            if float(value) > 0:
                names.add(c)
        table[_csv_path(row["path"], base)] = names
    return table, set(columns)


def _csv_path(text: str, base: Path) -> str:
    """Absolute paths as they are; relative ones from the CSV's folder, else from the working folder
    (the trainer writes its image paths as it was given them)."""
    path = Path(text)
    if path.is_absolute() or not (base / path).exists():
        return str(path)
    return str(base / path)


def emoji_ground_truth(paths: Sequence[Path], domains: Sequence[str]) -> GroundTruth:
    """Ground truth of the embedded Twemoji persons from their CLDR names (person_attributes)."""
    from training.labeling.emoji import PERSON_EVAL_DOMAINS, person_attributes, twemoji_entries

    table = {str(e.path): person_attributes(e.name) for e in twemoji_entries()}
    rows = _match_rows(paths, table, "from the Twemoji names")
    labels = torch.tensor([[1.0 if d in row else 0.0 for d in domains] for row in rows])
    return GroundTruth(labels, [d in PERSON_EVAL_DOMAINS for d in domains], "twemoji names")


def read_labels_csv(file: Path, paths: Sequence[Path], domains: Sequence[str],
                    moved: tuple[str, Path] | None = None) -> torch.Tensor:
    """The trainer's pseudo_labels.csv as [N, D] rows in the run's image order. `moved` =
    (data folder as train_config.json records it, the folder in use): rows under the recorded
    folder are read as the same files under the folder in use (a relative --data, moved data)."""
    table, vocabulary = _read_gt_csv(file)
    if moved is not None:
        recorded, data_dir = Path(moved[0]), moved[1]
        rebased = {}
        for text, row in table.items():
            path = Path(text)
            rebased[str(data_dir / path.relative_to(recorded)) if path.is_relative_to(recorded) else text] = row
        table = rebased
    missing = [d for d in domains if d not in vocabulary]
    if missing:
        raise EvalError(f"{file} has no column for domains {missing}")
    rows = _match_rows(paths, table, str(file))
    return torch.tensor([[1.0 if d in row else 0.0 for d in domains] for row in rows])
