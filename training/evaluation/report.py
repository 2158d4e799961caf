"""The written parts of an evaluation: eval.md (`markdown_report`) and eval_curves.png (`read_curves`,
`curves_plot`), both from plain data (eval.json's content, metrics.jsonl).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lanit_rt.checkpoint import atomic_write
from training.evaluation.inputs import MODES, EvalError
from training.grid import text_font


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
    font = text_font(10)
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


def translated_per_domain(result: dict[str, Any]) -> str:
    """How many sources each target translated: "n = 50", or what a small data set allowed (the
    sources of a target are the images outside it) beside the n asked for."""
    n = result["settings"]["n"]
    counts = sorted({row.get("num_translated", n) for row in result["translation"]["per_domain"].values()})
    if counts == [n]:
        return f"n = {n}"
    got = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{got} (fewer than the n = {n} asked: only that many images lie outside the target)"


def markdown_report(result: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{result['run_dir']}`", "",
             f"Labeler / feature extractor: `{result['labeler']}`; seed {result['seed']}; "
             f"{translated_per_domain(result)} translations per domain; step {result['step']}.", ""]
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
    lines.append(row("real images of the target", tr["real_mean"]))
    for name, why in tr["skipped"].items():
        lines.append(f"\nskipped {name}: {why}")
    lines.append("")
    return "\n".join(lines)


def headline_table(result: dict[str, Any]) -> str:
    """The few figures a user looks at first: for the translations, for untranslated sources (the
    floor) and, for the two accuracies, for the real images of each target (the labeler's reading
    of genuine members)."""
    tr = result["translation"]
    rows = [("translations", tr["mean"]), ("untranslated sources", tr["identity_mean"]),
            ("real images of the target", tr["real_mean"])]
    lines = [f"quality at step {result['step']} ({result['labeler']} features; "
             f"{translated_per_domain(result)} sources per domain):", "",
             "| | domain accuracy | top-1 accuracy | content | mFD | mKID x1e3 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(m['domain_accuracy'])} | {_fmt(m['top1_accuracy'])} | {_fmt(m['content'])} | "
              f"{_fmt(m['fd'], 4)} | {_fmt(m['kid'], 3, 1e3)} |" for name, m in rows]
    lines += ["", "domain accuracy: the labeler turns the target on (adaptive rule); top-1: the target "
              "scores highest"]
    f1 = result["summary"].get("macro_f1_stage1")
    if f1 is not None:
        lines += ["", f"pseudo-labels vs ground truth: macro F1 {f1:.3f} (adaptive)"]
    return "\n".join(lines)
