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
("identity") give the floor a translator has to beat; the two accuracies on the real images of k
("real") give the labeler's own reading of genuine members, the scale for the translations' ones
(at small image sizes the adaptive rule turns few domains on for real images, and many for noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from lanit_rt.checkpoint import CheckpointError, LanitModel, atomic_write, atomic_write_text
from lanit_rt.config import ConfigError
from lanit_rt.errors import first_line
from training.cli import one_line_warnings
from training.data import DataError, ImageSet
from training.evaluation import metrics
from training.evaluation.inputs import (LABELS_FILE, METRICS_FILE, MODES, PROMPTS_FILE, EvalError, GroundTruth,
                                        RunInfo, check_device, default_cache_dir, emoji_ground_truth,
                                        read_ground_truth, read_labels_csv, read_run, resolve_templates,
                                        train_config_object)
from training.evaluation.report import curves_plot, markdown_report, read_curves
from training.grid import text_font, wrap_text

DC_NEIGHBOURS = 5  # Density & Coverage k, as in Naeem et al. and the LANIT paper


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


# What `python -m training.run` evaluates at its end: 50 translations per domain, fewer KID subsets.
QUICK_SETTINGS = EvalSettings(n=50, kid_subsets=20)


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
        except Exception as err:  # noqa: BLE001 - a damaged file raises safetensors' own error type
            first = first_line(err)
            raise EvalError(f"{prompts_file} is damaged or does not match this labeler's prompts: "
                            f"{first}") from None
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


def target_accuracies(bank, feats: torch.Tensor, k: int) -> dict[str, float]:
    """How the stage-1 labeler reads images [N, E] as domain k: domain accuracy (the adaptive rule
    turns k on) and top-1 accuracy (k scores highest)."""
    labels, scores = label_with(bank, feats, "adaptive", 1, 0.0)
    wanted = torch.zeros_like(labels)
    wanted[:, k] = 1.0
    return {"domain_accuracy": metrics.domain_accuracy(labels, wanted),
            "top1_accuracy": metrics.top1_accuracy(scores, torch.full((len(feats),), k))}


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
    real: dict[str, Any] = {}
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
        per_domain[name] = {
            "num_real": len(reals), "num_translated": len(src),
            **set_metrics(real_feats, fake_feats, settings, settings.seed + k),
            **target_accuracies(stage1_bank, fake_feats, k),
            "content": metrics.content_preservation(src_feats, fake_feats),
            "sources": [str(images.paths[i]) for i in src.tolist()],
        }
        identity[name] = {
            **set_metrics(real_feats, src_feats, settings, settings.seed + k),
            **target_accuracies(stage1_bank, src_feats, k),
            "content": 1.0,
        }
        real[name] = {"num_real": len(reals), **target_accuracies(stage1_bank, real_feats, k)}
    if not per_domain:
        raise EvalError(f"no domain could be evaluated: {skipped}")
    return {"per_domain": per_domain, "mean": _means(per_domain), "identity": identity,
            "identity_mean": _means(identity), "real": real, "real_mean": _means(real),
            "skipped": skipped,
            "style": "latent (mapping network, random z)" if model.mapping is not None else "style table"}


def _means(per_domain: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    keys = ("fd", "kid", "density", "coverage", "domain_accuracy", "top1_accuracy", "content")
    out: dict[str, float | None] = {}
    for key in keys:
        values = [v[key] for v in per_domain.values() if v.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


# ----------------------------------------------------------------------------- pictures

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
    font = text_font()
    for c, title in enumerate(titles):
        left = pad + c * (cell + pad)
        for li, line in enumerate(wrap_text(draw, title, font, cell)):  # two lines at most
            draw.text((left, 2 + 12 * li), line, fill="black", font=font)
        for r in range(len(rows)):
            sheet.paste(_to_pil(columns[c][r], cell), (left, header + r * (cell + pad)))
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return {"rows": [str(images.paths[i]) for i in rows.tolist()], "columns": titles}


# ----------------------------------------------------------------------------- entry points

def evaluate_run(run_dir: str | Path, vl=None, *, gt: str | Path | None = None,
                 labeler: str | None = None, settings: EvalSettings = EvalSettings(),
                 cache_dir: str | Path | None = None, device: str = "cpu",
                 data: str | Path | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run folder, write eval.json / eval.md / eval_samples.png / eval_curves.png into
    `out` (default: the run folder), and return the eval.json content. `vl` (a VisionLanguage)
    overrides `labeler` (a name for training.labeling.vl.load_vision_language; default: the labeler
    the run was trained with); `data` overrides the run's image folder. Bad settings (device, top-k,
    an unwritable output folder) raise EvalError before any image is encoded."""
    device = str(check_device(device))
    torch.manual_seed(settings.seed)
    run = read_run(run_dir, device, progress=settings.progress, data=data, out_dir=out)
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
            label_results["trainer_mode"] = train_config_object(run.train_config).label_rule
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

    out_dir = run.run_dir if out is None else Path(out)
    samples = sample_sheet(out_dir / "eval_samples.png", run.model, images, members, settings)
    curves = read_curves(run.run_dir / METRICS_FILE)
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
    p.add_argument("--n", type=int, default=EvalSettings.n,
                   help=f"sources translated per domain (default {EvalSettings.n}; training's closing "
                        f"evaluation uses {QUICK_SETTINGS.n})")
    p.add_argument("--seed", type=int, default=EvalSettings.seed,
                   help=f"seed of the sources, latents and KID subsets (default {EvalSettings.seed})")
    p.add_argument("--labeler", help="VL model for labels and features (default: the run's labeler)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--data", help="the run's training-image folder (default: the one in train_config.json, "
                                  "searched from the run's working folder, here, then the folders above the run)")
    p.add_argument("--batch-size", type=int, default=EvalSettings.batch_size,
                   help=f"images per forward pass (default {EvalSettings.batch_size})")
    p.add_argument("--cache-dir", help="image-feature cache (default: the trainer's)")
    p.add_argument("--topk", type=int, help="k of the top-k mode (default: the run's)")
    p.add_argument("--threshold", type=float, help="threshold of the threshold mode (default: the run's)")
    p.add_argument("--out", metavar="DIR", help="folder for eval.json, eval.md and the two PNGs (default: the "
                                                 "run folder, replacing the files of training's closing evaluation)")
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
    if args.seed < 0:  # numpy's generators (KID's subsets) take no negative seed
        print(f"error: --seed must be >= 0, got {args.seed}", file=sys.stderr)
        return 2
    if args.threshold is not None and not math.isfinite(args.threshold):
        print(f"error: --threshold must be a finite number, got {args.threshold}", file=sys.stderr)
        return 2
    settings = EvalSettings(n=args.n, seed=args.seed, batch_size=args.batch_size, topk=args.topk,
                            threshold=args.threshold, progress=not args.no_progress)
    from training.labeling.pseudo_labels import ImageFeatureError
    from training.labeling.views import VisionLanguageError

    try:
        with one_line_warnings():
            result = evaluate_run(args.run_dir, gt=args.gt, labeler=args.labeler, settings=settings,
                                  cache_dir=args.cache_dir, device=args.device, data=args.data,
                                  out=args.out)
    except (EvalError, CheckpointError, ConfigError, DataError, ImageFeatureError, VisionLanguageError,
            OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: eval.json and eval.md were not written", file=sys.stderr)
        return 130
    print(markdown_report(result))
    print(f"wrote {Path(args.out or args.run_dir) / 'eval.json'}, eval.md, eval_samples.png"
          + (", eval_curves.png" if result["curves"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
