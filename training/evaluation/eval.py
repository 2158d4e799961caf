"""`python -m training.eval RUN_DIR`: pseudo-label and translation quality of a training run.

Reads a run folder written by `python -m training.run` (model.safetensors, train_config.json,
metrics.jsonl, optional prompts.safetensors and pseudo_labels.csv) and writes beside them:

- eval.json: every number below, with the settings that produced it;
- eval.md: the tables, laid out like the papers' (macro F1; mFD, mKID, Density & Coverage);
- eval_samples.png: rows = sources; columns = source, each single domain, two multi-hot targets;
- eval_curves.png: the logged training curves (drawn with PIL).

(a) Pseudo-label quality. Ground truth is a CSV (`path` + one 0/1 column per domain, or `path` +
`domains` separated by ';'), a folder with one sub-folder per domain, or, for the embedded Twemoji
data, the attributes parsed from the emoji names (never seen in training). Per-domain P/R/F1 and macro
F1 for each labelling mode (adaptive, top-k, threshold) with the stage-1 prompts and, when the run
learned prompts (stage 2), with the learned ones; plus the trainer's own final labels.

(b) Translation quality per target domain k: n sources that do not have domain k are translated to k
(latent-guided: mapping network with seeded random z). Features come from the labeler's image tower
(VisionLanguage.encode_images) on model-size images, for real and translated images alike:
FD and KID between the translations and the real images of k, Density & Coverage (k=5) with the
reals as the reference set, domain accuracy (the stage-1 adaptive labeler turns k on for the
translation), top-1 accuracy, content preservation (cosine of source vs translation features).
mFD / mKID etc. are means over the target domains. The same metrics for the untranslated sources
("identity") give the floor a translator has to beat.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from lanit_rt.checkpoint import (CheckpointError, LanitModel, OutputPathError, atomic_write, atomic_write_text,
                                 check_output_file, load_checkpoint)
from lanit_rt.config import ConfigError
from training.evaluation import metrics
from training.cli import one_line_warnings
from training.data import DataError, ImageSet, check_images, find_images

TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "pseudo_labels.csv"
PROMPTS_FILE = "prompts.safetensors"
OUTPUT_FILES = ("eval.json", "eval.md", "eval_samples.png", "eval_curves.png")
MODES = ("adaptive", "topk", "threshold")
DC_NEIGHBOURS = 5  # Density & Coverage k, as in Naeem et al. and the LANIT paper


class EvalError(ValueError):
    """The run folder or the ground truth cannot be evaluated."""


@dataclass(frozen=True)
class EvalSettings:
    n: int = 100  # sources translated per target domain
    seed: int = 0
    batch_size: int = 32
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    sample_rows: int = 6
    max_real: int = 5000  # reals per domain kept (seeded subsample) for FD / KID / D&C
    topk: int | None = None  # None -> the run's training config
    threshold: float | None = None
    progress: bool = True


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


def run_origin(run_dir: Path, out: str | None) -> Path | None:
    """The working folder of the `training.run` that wrote `run_dir`: train_config.json keeps --out
    as it was given, so a relative `out` that ends the resolved run path gives the folder before it."""
    if not out or Path(out).is_absolute():
        return None
    parts = Path(out).parts
    resolved = run_dir.resolve()
    if ".." in parts or not parts or len(parts) >= len(resolved.parts) or resolved.parts[-len(parts):] != parts:
        return None
    return resolved.parents[len(parts) - 1]


def resolve_data_dir(data: str, run_dir: Path, origin: Path | None) -> Path:
    """The run's training-image folder. train_config.json keeps --data as it was given, so a
    relative path is tried from the current folder, then from the folder the run was started in,
    then from each folder above the run folder (the filesystem root excluded)."""
    given = Path(data).expanduser()
    if given.is_absolute():
        candidates = [given]
    else:
        resolved = run_dir.resolve()
        bases = [Path.cwd(), *([origin] if origin is not None else []),
                 *[p for p in resolved.parents if p != Path(p.anchor)]]
        candidates = list(dict.fromkeys(base / given for base in bases))
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


def check_output_folder(run_dir: Path) -> None:
    """The eval files must be writable in `run_dir`: checked before any work, not at the last write."""
    for name in OUTPUT_FILES:
        try:
            check_output_file(run_dir / name)
        except OutputPathError as err:
            raise EvalError(f"cannot write the evaluation into the run folder: {err}") from None


def read_run(run_dir: str | Path, device: str | torch.device = "cpu", progress: bool = True,
             data: str | Path | None = None) -> RunInfo:
    """Load the checkpoint and resolve the run's training images (as the trainer did). `data`
    replaces the image folder recorded in train_config.json (moved data, another working folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} does not exist")
    cfg_file = run_dir / TRAIN_CONFIG_FILE
    if not cfg_file.exists():
        raise EvalError(f"{run_dir} has no {TRAIN_CONFIG_FILE}; is it a `python -m training.run` folder?")
    try:
        train_config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{cfg_file} is not valid JSON: {err}") from None
    check_output_folder(run_dir)
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

    cfg = _train_config_object(run.train_config)
    return read_templates(cfg, cfg.template_rule)


def _train_config_object(data: dict[str, Any]):
    from training.config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known})


def default_cache_dir(run: RunInfo) -> Path:
    from training.train import cache_root

    root = cache_root(_train_config_object(run.train_config)).expanduser()
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
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [name.strip() for name in reader.fieldnames or []]  # "path, blond hair"
        reader.fieldnames = fields
        if "path" not in fields:
            raise EvalError(f"{file}: a ground-truth CSV needs a 'path' column, got {fields}")
        rows = list(reader)
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


# ----------------------------------------------------------------------------- features and labels

@torch.no_grad()
def encode(vl, images: torch.Tensor | ImageSet, batch_size: int, desc: str, progress: bool) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] (or an ImageSet, decoded batch by batch) -> L2-normalised VL
    image features [N, E] float32 on the CPU."""
    device = _module_device(vl)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch",
                      disable=not progress, leave=False):
        if isinstance(images, ImageSet):
            batch = images.batch(torch.arange(start, min(start + batch_size, len(images))))
        else:
            batch = images[start:start + batch_size]
        out.append(vl.encode_images(batch.to(device)).float().cpu())
    return torch.cat(out)


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def prompt_banks(vl, run: RunInfo, device) -> dict[str, Any]:
    """{"stage1": fixed-template bank, "learned": bank with the run's learned context (if any)}."""
    from training.labeling.prompts import PromptBank

    domains = list(run.model.config.domains)
    templates = resolve_templates(run)
    base_prompt = run.train_config.get("base_prompt")
    banks = {"stage1": PromptBank(vl, domains, templates=templates, base_prompt=base_prompt).to(device)}
    prompts_file = run.run_dir / PROMPTS_FILE
    if prompts_file.exists():
        from safetensors.torch import load_file

        learned = PromptBank(vl, domains, templates=templates, base_prompt=base_prompt,
                             learnable=True).to(device)
        try:
            learned.load_state_dict(load_file(str(prompts_file), device=str(device)))
        except (RuntimeError, OSError) as err:
            first = str(err).strip().splitlines()[0]
            raise EvalError(f"{prompts_file} does not match this labeler's prompts: {first}") from None
        banks["learned"] = learned.eval()
    return banks


@torch.no_grad()
def label_with(bank, feats: torch.Tensor, mode: str, topk: int, threshold: float):
    from training.labeling.pseudo_labels import pseudo_labels

    domain_feats, base_feat = bank()
    device = domain_feats.device
    labels, scores = pseudo_labels(feats.to(device), domain_feats, base_feat, mode=mode, topk=topk,
                                   threshold=threshold)
    return labels.float().cpu(), scores.float().cpu()


def label_quality(labels: torch.Tensor, gt: GroundTruth, domains: Sequence[str]) -> dict[str, Any]:
    cols = gt.known_domains
    return metrics.multilabel_scores(labels[:, cols], gt.labels[:, cols], [domains[k] for k in cols])


# ----------------------------------------------------------------------------- translation

@torch.no_grad()
def translate(model: LanitModel, sources: torch.Tensor, weights: torch.Tensor,
              z: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """Latent-guided (mapping network with z) when z is given, else the per-domain style table."""
    device = _module_device(model.generator)
    out = []
    for start in range(0, sources.shape[0], batch_size):
        w = weights[start:start + batch_size].to(device)
        if z is not None:
            style = model.mapping(z[start:start + batch_size].to(device), w)
        else:
            style = model.domain_style(w)
        out.append(model.generator(sources[start:start + batch_size].to(device), style).clamp(-1, 1).cpu())
    return torch.cat(out)


def set_metrics(real: torch.Tensor, fake: torch.Tensor, settings: EvalSettings, seed: int) -> dict[str, Any]:
    """FD, KID (mean/std over subsets) and Density & Coverage of fake features against real ones."""
    kid, kid_std = metrics.kernel_inception_distance(
        fake, real, num_subsets=settings.kid_subsets, subset_size=settings.kid_subset_size, seed=seed)
    out = {"fd": metrics.frechet_distance(fake, real), "kid": kid, "kid_std": kid_std,
           "density": None, "coverage": None}
    if real.shape[0] > DC_NEIGHBOURS:
        out["density"], out["coverage"] = metrics.density_coverage(real, fake, k=DC_NEIGHBOURS)
    return out


def translation_quality(vl, run: RunInfo, images: ImageSet, feats: torch.Tensor, members: torch.Tensor,
                        stage1_bank, settings: EvalSettings) -> dict[str, Any]:
    """Per target domain metrics (see the module docstring) and their means."""
    model, domains = run.model, run.model.config.domains
    d = len(domains)
    per_domain: dict[str, Any] = {}
    identity: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for k in tqdm(range(d), desc="translating", unit="domain", disable=not settings.progress):
        name = domains[k]
        reals = torch.nonzero(members[:, k] > 0).flatten()
        candidates = torch.nonzero(members[:, k] <= 0).flatten()
        if len(reals) < 2 or len(candidates) < 2:
            skipped[name] = f"{len(reals)} real and {len(candidates)} source images (need 2 of each)"
            continue
        gen = torch.Generator().manual_seed(settings.seed * 1009 + k)
        src = candidates[torch.randperm(len(candidates), generator=gen)[: settings.n]]
        if len(reals) > settings.max_real:
            reals = reals[torch.randperm(len(reals), generator=gen)[: settings.max_real]]
        weights = torch.zeros(len(src), d)
        weights[:, k] = 1.0
        z = (torch.randn(len(src), model.config.latent_dim, generator=gen)
             if model.mapping is not None else None)
        fakes = translate(model, images.batch(src), weights, z, settings.batch_size)
        fake_feats = encode(vl, fakes, settings.batch_size, f"features {name}", False)
        real_feats, src_feats = feats[reals], feats[src]
        fake_labels, fake_scores = label_with(stage1_bank, fake_feats, "adaptive", 1, 0.0)
        src_labels, src_scores = label_with(stage1_bank, src_feats, "adaptive", 1, 0.0)
        target = torch.full((len(src),), k)
        per_domain[name] = {
            "num_real": len(reals), "num_translated": len(src),
            **set_metrics(real_feats, fake_feats, settings, settings.seed + k),
            "domain_accuracy": metrics.domain_accuracy(fake_labels, weights),
            "top1_accuracy": metrics.top1_accuracy(fake_scores, target),
            "content": metrics.content_preservation(src_feats, fake_feats),
            "sources": [str(images.paths[i]) for i in src.tolist()],
        }
        identity[name] = {
            **set_metrics(real_feats, src_feats, settings, settings.seed + k),
            "domain_accuracy": metrics.domain_accuracy(src_labels, weights),
            "top1_accuracy": metrics.top1_accuracy(src_scores, target),
            "content": 1.0,
        }
    if not per_domain:
        raise EvalError(f"no domain could be evaluated: {skipped}")
    return {"per_domain": per_domain, "mean": _means(per_domain), "identity": identity,
            "identity_mean": _means(identity), "skipped": skipped,
            "style": "latent (mapping network, random z)" if model.mapping is not None else "style table"}


def _means(per_domain: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    keys = ("fd", "kid", "density", "coverage", "domain_accuracy", "top1_accuracy", "content")
    out: dict[str, float | None] = {}
    for key in keys:
        values = [v[key] for v in per_domain.values() if v.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


# ----------------------------------------------------------------------------- pictures

def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _to_pil(image: torch.Tensor, cell: int) -> Image.Image:
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    tile = Image.fromarray(array)
    return tile if tile.size[0] == cell else tile.resize((cell, cell), Image.NEAREST)


def combination_targets(members: torch.Tensor, domains: Sequence[str],
                        count: int = 2) -> list[tuple[int, int]]:
    """The `count` domain pairs that co-occur most in `members` [N, D] (ties: lower indices first)."""
    d = len(domains)
    co = (members.T @ members) if members.numel() else torch.zeros(d, d)
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    pairs.sort(key=lambda ij: (-float(co[ij[0], ij[1]]), ij))
    return pairs[:count]


@torch.no_grad()
def sample_sheet(path: Path, model: LanitModel, images: ImageSet, members: torch.Tensor,
                 settings: EvalSettings) -> dict[str, Any]:
    """Rows: sources; columns: source, each domain, two multi-hot pairs (style-table styles)."""
    domains = model.config.domains
    d = len(domains)
    gen = torch.Generator().manual_seed(settings.seed)
    rows = torch.randperm(len(images), generator=gen)[: settings.sample_rows]
    sources = images.batch(rows)
    targets = [torch.eye(d)[k] for k in range(d)]
    titles = ["source"] + list(domains)
    for i, j in combination_targets(members, domains):
        weights = torch.zeros(d)
        weights[[i, j]] = 1.0
        targets.append(weights)
        titles.append(f"{domains[i]} + {domains[j]}")
    columns = [sources] + [translate(model, sources, t.expand(len(rows), d).clone(), None,
                                     settings.batch_size) for t in targets]
    cell, pad, header = max(64, model.config.img_size), 2, 28
    sheet = Image.new("RGB", (pad + len(columns) * (cell + pad), header + len(rows) * (cell + pad) + pad),
                      "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for c, title in enumerate(titles):
        left = pad + c * (cell + pad)
        words, lines = title.split(" "), [""]
        for word in words:  # wrap the title to the cell width, two lines at most
            trial = (lines[-1] + " " + word).strip()
            if draw.textlength(trial, font=font) <= cell or not lines[-1]:
                lines[-1] = trial
            else:
                lines.append(word)
        for li, line in enumerate(lines[:2]):
            draw.text((left, 2 + 12 * li), line, fill="black", font=font)
        for r in range(len(rows)):
            sheet.paste(_to_pil(columns[c][r], cell), (left, header + r * (cell + pad)))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return {"rows": [str(images.paths[i]) for i in rows.tolist()], "columns": titles}


def read_curves(file: Path) -> dict[str, list[tuple[float, float]]]:
    """metrics.jsonl -> {key: [(step, value)]} for every numeric key but step/time (nested: 'a/b')."""
    curves: dict[str, list[tuple[float, float]]] = {}
    if not file.exists():
        return curves
    lines = file.read_text(encoding="utf-8").splitlines()
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if line_no == len(lines):  # the half-written last line of a killed run
                warnings.warn(f"{file}:{line_no} is cut short (a run killed while logging?); "
                              "the curves end at the line before", stacklevel=2)
                break
            raise EvalError(f"{file}:{line_no} is not JSON: {err}") from None
        if "step" not in record:
            raise EvalError(f"{file}:{line_no} has no 'step'")
        for key, value in _flatten(record).items():
            if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if np.isfinite(value):
                curves.setdefault(key, []).append((float(record["step"]), float(value)))
    return curves


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def curves_plot(path: Path, curves: dict[str, list[tuple[float, float]]]) -> None:
    """One small panel per curve (3 per row): polyline over steps, y range and step range printed."""
    keys = sorted(curves)
    if not keys:
        raise EvalError("no numeric curve to draw")
    width, height, per_row = 300, 170, 3
    n_rows = (len(keys) + per_row - 1) // per_row
    canvas = Image.new("RGB", (width * min(per_row, len(keys)), height * n_rows), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    for i, key in enumerate(keys):
        ox, oy = (i % per_row) * width, (i // per_row) * height
        box = (ox + 44, oy + 18, ox + width - 10, oy + height - 22)  # plot area
        points = curves[key]
        steps = np.array([p[0] for p in points])
        values = np.array([p[1] for p in points])
        x0, x1 = float(steps.min()), float(steps.max())
        y0, y1 = float(values.min()), float(values.max())
        if y1 - y0 < 1e-12:  # flat curve: give it a visible band
            y0, y1 = y0 - 0.5, y1 + 0.5
        if x1 - x0 < 1e-12:
            x0, x1 = x0 - 0.5, x1 + 0.5
        draw.text((ox + 44, oy + 3), key, fill="black", font=font)
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text((ox + 2, box[1]), f"{y1:.3g}", fill="black", font=font)
        draw.text((ox + 2, box[3] - 10), f"{y0:.3g}", fill="black", font=font)
        draw.text((box[0], box[3] + 4), f"{x0:g}", fill="black", font=font)
        draw.text((box[2] - 40, box[3] + 4), f"step {x1:g}", fill="black", font=font)
        xs = box[0] + (steps - x0) / (x1 - x0) * (box[2] - box[0])
        ys = box[3] - (values - y0) / (y1 - y0) * (box[3] - box[1])
        xy = list(zip(xs.tolist(), ys.tolist()))
        if len(xy) == 1:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=(31, 119, 180))
        else:
            draw.line(xy, fill=(31, 119, 180), width=2)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


# ----------------------------------------------------------------------------- report

def _fmt(value: float | None, digits: int = 3, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown_report(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{result['run_dir']}`", "",
             f"Labeler / feature extractor: `{result['labeler']}`; seed {result['seed']}; "
             f"n = {result['settings']['n']} translations per domain; step {result['step']}.", ""]
    labels = result["pseudo_labels"]
    if labels.get("ground_truth") is None:
        lines += ["Pseudo-label quality: no ground truth (pass --gt).", ""]
    else:
        gt = labels["ground_truth"]
        lines += [f"## Pseudo-label quality (macro F1 over {len(gt['domains'])} domains; "
                  f"ground truth: {gt['source']}, {gt['images']} images)", "",
                  "| prompts | adaptive (score > 0) | top-k (k={}) | threshold (cos > {:g}) |".format(
                      labels["settings"]["topk"], labels["settings"]["threshold"]),
                  "|---|" + "---|" * len(MODES)]
        for prompts in ("stage1", "learned"):
            if prompts in labels:
                lines.append(f"| {prompts} | " + " | ".join(
                    _fmt(labels[prompts][m]["macro_f1"]) for m in MODES) + " |")
        if labels.get("trainer") is not None:
            lines.append(f"| trainer's final labels ({labels['trainer_mode']}) | "
                         + _fmt(labels["trainer"]["macro_f1"]) + " |" + " |" * (len(MODES) - 1))
        best = labels.get("learned", labels["stage1"])["adaptive"]["per_domain"]
        lines += ["", "| domain | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, row in best.items():
            lines.append(f"| {name} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                         f"{_fmt(row['f1'])} | {row['support']} |")
        lines.append("")
        which = "learned" if "learned" in labels else "stage-1"
        lines.append(f"(per-domain rows: adaptive mode, {which} prompts)")
        lines.append("")
    tr = result["translation"]
    lines += [f"## Translation quality (members of each domain: {result['members']}; style: {tr['style']})",
              "", "| target | FD | KID x1e3 | density | coverage | domain acc | top-1 acc | content |",
              "|---|---|---|---|---|---|---|---|"]

    def row(name: str, m: dict[str, Any]) -> str:
        return (f"| {name} | {_fmt(m['fd'], 4)} | {_fmt(m['kid'], 3, 1e3)} | {_fmt(m['density'])} | "
                f"{_fmt(m['coverage'])} | {_fmt(m['domain_accuracy'])} | {_fmt(m['top1_accuracy'])} | "
                f"{_fmt(m['content'])} |")

    for name, m in tr["per_domain"].items():
        lines.append(row(name, m))
    lines.append(row("**mean (mFD, mKID)**", tr["mean"]))
    lines.append(row("identity (untranslated sources)", tr["identity_mean"]))
    for name, why in tr["skipped"].items():
        lines.append(f"\nskipped {name}: {why}")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points

def evaluate_run(run_dir: str | Path, vl=None, *, gt: str | Path | None = None,
                 labeler: str | None = None, settings: EvalSettings = EvalSettings(),
                 cache_dir: str | Path | None = None, device: str = "cpu",
                 data: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run folder, write eval.json / eval.md / eval_samples.png / eval_curves.png, and
    return the eval.json content. `vl` (a VisionLanguage) overrides `labeler` (a name for
    training.labeling.vl.load_vision_language; default: the labeler the run was trained with); `data`
    overrides the run's image folder. Bad settings (device, top-k, an unwritable run folder) raise
    EvalError before any image is encoded."""
    device = str(check_device(device))
    torch.manual_seed(settings.seed)
    run = read_run(run_dir, device, progress=settings.progress, data=data)
    domains = run.model.config.domains
    labeler = labeler or run.train_config.get("labeler") or "lanit-lite"
    topk = settings.topk if settings.topk is not None else int(run.train_config.get("topk", 1))
    threshold = (settings.threshold if settings.threshold is not None
                 else float(run.train_config.get("threshold", 0.0)))
    if not 1 <= topk <= len(domains):
        raise EvalError(f"top-k must be in [1, {len(domains)}] for the run's {len(domains)} domains, "
                        f"got {topk} (--topk)")
    if vl is None:
        from training.labeling.vl import load_vision_language

        vl = load_vision_language(labeler, device=device)
    vl.eval()

    if gt is not None:
        truth = read_ground_truth(gt, run.paths, domains)
    elif run.default_data:
        truth = emoji_ground_truth(run.paths, domains)
    else:
        truth = None
    if truth is not None and not truth.known_domains:
        raise EvalError(f"the ground truth ({truth.source}) covers none of the domains {list(domains)}")

    from training.labeling.pseudo_labels import image_features

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(run)
    label_feats = image_features(vl, run.paths, cache, batch_size=settings.batch_size,
                                 progress=settings.progress)
    banks = prompt_banks(vl, run, _module_device(vl))
    label_results: dict[str, Any] = {"ground_truth": None}
    stage1_labels = label_with(banks["stage1"], label_feats, "adaptive", topk, threshold)[0]
    if truth is not None:
        label_results["ground_truth"] = {
            "source": truth.source, "images": len(run.paths),
            "domains": [domains[k] for k in truth.known_domains],
            "positives": {domains[k]: int(truth.labels[:, k].sum()) for k in truth.known_domains}}
        for prompts, bank in banks.items():
            label_results[prompts] = {
                mode: label_quality(label_with(bank, label_feats, mode, topk, threshold)[0], truth, domains)
                for mode in MODES}
        trainer_csv = run.run_dir / LABELS_FILE
        if trainer_csv.exists():
            recorded = run.train_config.get("data")
            moved = (str(recorded), run.data_dir) if recorded is not None and run.data_dir is not None else None
            trainer_labels = read_labels_csv(trainer_csv, run.paths, domains, moved=moved)
            label_results["trainer"] = label_quality(trainer_labels, truth, domains)
            label_results["trainer_mode"] = _train_config_object(run.train_config).label_rule
    label_results["settings"] = {"topk": topk, "threshold": threshold,
                                 "templates": resolve_templates(run)}

    images = ImageSet(run.paths, run.model.config.img_size, progress=settings.progress)
    feats = encode(vl, images, settings.batch_size, "features", settings.progress)
    if truth is not None and len(truth.known_domains) == len(domains):
        members, members_from = truth.labels, f"ground truth ({truth.source})"
    else:
        members, members_from = stage1_labels, "stage-1 adaptive pseudo-labels"
        if truth is not None:  # use the ground truth where it exists
            members = members.clone()
            members[:, truth.known_domains] = truth.labels[:, truth.known_domains]
            members_from = f"ground truth ({truth.source}) where known, else stage-1 pseudo-labels"
    translation = translation_quality(vl, run, images, feats, members, banks["stage1"], settings)

    out_dir = run.run_dir
    samples = sample_sheet(out_dir / "eval_samples.png", run.model, images, members, settings)
    curves = read_curves(out_dir / METRICS_FILE)
    if curves:
        curves_plot(out_dir / "eval_curves.png", curves)

    result = {
        "run_dir": str(run.run_dir), "data_dir": None if run.data_dir is None else str(run.data_dir),
        "step": run.model.metadata.get("step"),
        "stage": run.model.metadata.get("stage", run.train_config.get("stage")),
        "labeler": getattr(vl, "name", labeler), "seed": settings.seed,
        "settings": dataclasses.asdict(settings), "domains": list(domains),
        "num_images": len(run.paths), "members": members_from,
        "pseudo_labels": label_results, "translation": translation,
        "summary": {
            "macro_f1_stage1": (label_results["stage1"]["adaptive"]["macro_f1"]
                                if "stage1" in label_results else None),
            "macro_f1_learned": (label_results["learned"]["adaptive"]["macro_f1"]
                                 if "learned" in label_results else None),
            "mFD": translation["mean"]["fd"], "mKID": translation["mean"]["kid"],
            "density": translation["mean"]["density"], "coverage": translation["mean"]["coverage"],
            "domain_accuracy": translation["mean"]["domain_accuracy"],
            "content": translation["mean"]["content"],
        },
        "samples": samples, "curves": sorted(curves),
    }
    atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / "eval.md", markdown_report(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a `python -m training.run` output folder")
    p.add_argument("--gt", help="ground truth: CSV (path + 0/1 domain columns, or path,domains with "
                                "';') or a folder with one sub-folder per domain")
    p.add_argument("--n", type=int, default=EvalSettings.n, help="sources translated per domain")
    p.add_argument("--seed", type=int, default=EvalSettings.seed)
    p.add_argument("--labeler", help="VL model for labels and features (default: the run's labeler)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--data", help="the run's training-image folder (default: the one in train_config.json, "
                                  "searched from here, the run's working folder and the folders above the run)")
    p.add_argument("--batch-size", type=int, default=EvalSettings.batch_size)
    p.add_argument("--cache-dir", help="image-feature cache (default: the trainer's)")
    p.add_argument("--topk", type=int, help="k of the top-k mode (default: the run's)")
    p.add_argument("--threshold", type=float, help="threshold of the threshold mode (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 2 or args.batch_size < 1:
        print("error: --n must be >= 2 and --batch-size >= 1", file=sys.stderr)
        return 2
    if args.topk is not None and args.topk < 1:
        print(f"error: --topk must be >= 1, got {args.topk}", file=sys.stderr)
        return 2
    settings = EvalSettings(n=args.n, seed=args.seed, batch_size=args.batch_size, topk=args.topk,
                            threshold=args.threshold, progress=not args.no_progress)
    from training.labeling.pseudo_labels import ImageFeatureError
    from training.labeling.views import VisionLanguageError

    try:
        with one_line_warnings():
            result = evaluate_run(args.run_dir, gt=args.gt, labeler=args.labeler, settings=settings,
                                  cache_dir=args.cache_dir, device=args.device, data=args.data)
    except (EvalError, CheckpointError, ConfigError, DataError, ImageFeatureError, VisionLanguageError,
            OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: eval.json and eval.md were not written", file=sys.stderr)
        return 130
    print(markdown_report(result))
    print(f"wrote {Path(args.run_dir) / 'eval.json'}, eval.md, eval_samples.png"
          + (", eval_curves.png" if result["curves"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
