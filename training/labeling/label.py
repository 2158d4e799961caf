"""Pseudo-label a folder of images against domain texts, to inspect labels before training.

    python -m training.label IMAGES_DIR --domains "blond hair,red hair,beard" --out labels.csv

Writes labels.csv (columns `path`, then one 0/1 column per domain in the given order) and
labels_scores.json beside it (scores cos(x, domain) - cos(x, base) per image), and prints how many
images each domain got. The trainer makes its labels with the same code (training/labeling/pseudo_labels.py).
Unreadable images are left out of the table and counted. Image features are cached under
--cache (default $LANIT_CACHE/features, or ~/.cache/lanit-rt/features, as the trainer).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch

from lanit_rt.checkpoint import OutputPathError, check_output_file
from training.labeling.pseudo_labels import (
    LABEL_MODES,
    ImageFeatureError,
    image_features,
    label_counts,
    pseudo_labels,
    scores_json_path,
    write_labels_csv,
)


class LabelCLIError(ValueError):
    """A bad command line (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2 through main(), not SystemExit
        raise LabelCLIError(message)


def build_parser() -> argparse.ArgumentParser:
    from training.labeling.prompts import DEFAULT_TEMPLATE_SET, TEMPLATE_SETS

    p = _Parser(prog="python -m training.label", description=__doc__.split("\n\n")[0])
    p.add_argument("images", metavar="IMAGES_DIR", help="folder of JPEG/PNG/WebP images (searched recursively)")
    p.add_argument("--domains", required=True, help='comma-separated domain texts, e.g. "blond hair,beard"')
    p.add_argument("--labeler", default="lanit-lite",
                   help="lanit-lite (default), an open_clip name (ViT-B-32), MODEL:TAG, MODEL@/weights, "
                        "or a local path")
    p.add_argument("--mode", choices=LABEL_MODES, default="adaptive", help="labelling rule (default adaptive)")
    p.add_argument("--topk", type=int, default=1, help="domains per image in topk mode")
    p.add_argument("--threshold", type=float, default=0.0, help="cosine threshold in threshold mode")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--templates", metavar="FILE", help="prompt templates, one per line, each with one {}")
    group.add_argument("--template-set", default=None, choices=sorted(TEMPLATE_SETS),
                       help=f"built-in templates (default {DEFAULT_TEMPLATE_SET})")
    p.add_argument("--base", metavar="TEXT", default=None,
                   help="base prompt for the adaptive rule (default: each template without the domain)")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="learned prompt context (prompts.safetensors of a stage-2 run) for these templates")
    p.add_argument("--out", required=True, help="output CSV (the scores JSON is written beside it)")
    p.add_argument("--cache", metavar="DIR", default=None, help="image-feature cache folder")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_domains(text: str) -> list[str]:
    domains = [d.strip() for d in text.split(",") if d.strip()]
    if len(domains) < 2:
        raise LabelCLIError(f"--domains needs at least 2 comma-separated texts, got {domains}")
    if len(set(domains)) != len(domains):
        raise LabelCLIError(f"--domains has duplicates: {domains}")
    if "path" in domains:
        raise LabelCLIError("'path' cannot be a domain text: it heads the image column of the CSV")
    return domains


def read_template_file(path: str | os.PathLike) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        from training.labeling.prompts import TEMPLATE_SETS

        hint = f"; for the built-in set use --template-set {path}" if str(path) in TEMPLATE_SETS else ""
        raise LabelCLIError(f"cannot read templates file {path}: {err.strerror or err}{hint}") from None
    templates = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise LabelCLIError(f"{path}: every template needs exactly one '{{}}' (bad: {bad[:3]})")
    return templates


def default_cache_dir() -> Path:
    return Path(os.environ.get("LANIT_CACHE", Path.home() / ".cache" / "lanit-rt")) / "features"


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LabelCLIError(f"--device {name}: no CUDA device available")
    return name


def run(args: argparse.Namespace) -> dict[str, int]:
    from training.data import find_images
    from training.labeling.prompts import DEFAULT_TEMPLATE_SET, PromptBank, check_distinct_domains
    from training.labeling.vl import load_vision_language

    domains = parse_domains(args.domains)
    if args.templates:
        templates = read_template_file(args.templates)
    else:
        templates = args.template_set or DEFAULT_TEMPLATE_SET
    if args.topk < 1 or args.topk > len(domains):
        raise LabelCLIError(f"--topk must be in [1, {len(domains)}], got {args.topk}")
    if args.batch_size < 1:
        raise LabelCLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.threshold):  # nan compares false: every image would go unlabelled
        raise LabelCLIError(f"--threshold must be a finite number, got {args.threshold}")
    if args.prompts and not Path(args.prompts).is_file():
        raise LabelCLIError(f"--prompts {args.prompts}: no such file")
    try:  # before the model loads and the images are encoded, not at the final write
        for file in (args.out, scores_json_path(args.out)):
            check_output_file(file)
    except OutputPathError as err:
        raise LabelCLIError(f"--out {args.out}: {err}") from None
    paths = find_images(args.images)
    device = resolve_device(args.device)
    vl = load_vision_language(args.labeler, device=device)
    cache = None if args.no_cache else (Path(args.cache) if args.cache else default_cache_dir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = image_features(vl, paths, cache, batch_size=args.batch_size, progress=not args.quiet)
    readable = torch.isfinite(feats).all(dim=1)
    for w in caught[:5]:
        print(f"warning: {w.message}", file=sys.stderr)

    bank = PromptBank(vl, domains, templates=templates, base_prompt=args.base, learnable=bool(args.prompts))
    if args.prompts:
        from safetensors.torch import load_file

        try:
            bank.load_state_dict(load_file(args.prompts, device=str(vl.device)))
        except Exception as err:
            raise LabelCLIError(
                f"--prompts {args.prompts} does not match these templates/labeler ({err})") from None
    with torch.no_grad():
        domain_feats, base_feat = bank()
        try:
            check_distinct_domains(domain_feats, domains)
        except ValueError as err:
            raise LabelCLIError(str(err)) from None
        labels, scores = pseudo_labels(feats, domain_feats.cpu(), base_feat.cpu(), mode=args.mode,
                                       topk=args.topk, threshold=args.threshold)
    keep = torch.nonzero(readable).flatten().tolist()
    kept_paths = [paths[i] for i in keep]
    meta = {"labeler": vl.name, "mode": args.mode, "topk": args.topk, "threshold": args.threshold,
            "templates": bank.templates, "base_prompts": bank.base_prompts, "images_dir": str(args.images),
            "skipped": [str(paths[i]) for i in torch.nonzero(~readable).flatten().tolist()]}
    write_labels_csv(args.out, kept_paths, domains, labels[keep], scores[keep], meta=meta)

    counts = label_counts(labels[keep], domains)
    skipped = len(paths) - len(keep)
    print(f"labelled {len(keep)} images with {vl.name} ({args.mode})"
          + (f"; skipped {skipped} unreadable" if skipped else ""))
    width = max(len(d) for d in counts)
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count:6d}")
    print(f"wrote {args.out} and {scores_json_path(args.out)}")
    return counts


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    from training.data import DataError
    from training.labeling.views import VisionLanguageError

    try:
        run(build_parser().parse_args(argv))
    except (LabelCLIError, DataError, ImageFeatureError, VisionLanguageError, ImportError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the CSV and JSON are written whole at the end, or not at all
        print("interrupted: no labels were written (image features are cached once all are encoded)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
