"""LANIT pseudo-labels: image features (cached on disk), domain scores and multi-hot labels.

For an image feature x and domain features t_k (all L2-normalised), with the base feature b:

    score_k(x) = cos(x, t_k) - cos(x, b)                                  (domain_scores)

and the label modes of the paper:

- "adaptive" (default): domain k is on when score_k(x) > 0, i.e. the image is closer to the domain
  prompt than to the domain-free base prompt. An image may get several domains, or none (slack).
- "topk": the k domains with the highest scores (the same order as cos(x, t_k)).
- "adaptive-topk": the adaptive rule's domains, at most the k highest-scoring: an image whose
  domains all score below the base prompt stays unlabelled (slack), as under "adaptive".
- "threshold": domain k is on when cos(x, t_k) > threshold.

Unreadable images: `image_features` returns one row per input path, in order; a file that cannot
be decoded gets a row of NaN (and a warning), and `pseudo_labels` gives such rows no active domain
(slack) and NaN scores, so labels stay aligned with the caller's path list. When no file at all
can be read, `ImageFeatureError` is raised.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

LABEL_MODES = ("adaptive", "topk", "adaptive-topk", "threshold")
TOPK_MODES = ("topk", "adaptive-topk")  # the modes that read `topk`
CACHE_FORMAT = "lanit-rt-image-features/4"  # /2: raw (unnormalised) embeddings; /3: EXIF-rotated;
# /4: colour-keyed (PNG tRNS) grey and RGB pixels read as white
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Images per forward pass on CPU. lanit-lite's EfficientNet-Lite0 at 224 px on 2 threads:
# 12 ms/img at 8, 16 at 16, 23 at 32, 28 at 64 (activations fall out of cache as batches grow).
CPU_MICRO_BATCH = 8


class ImageFeatureError(ValueError):
    """No usable image features (no path given, or none of the images could be read)."""


# ----------------------------------------------------------------------------- scores and labels

def domain_scores(image_feats: torch.Tensor, domain_feats: torch.Tensor,
                  base_feat: torch.Tensor) -> torch.Tensor:
    """[N, E] x [D, E] x [E] -> [N, D] = cos(x, t_k) - cos(x, base). Inputs are re-normalised."""
    cos, base_cos = _cosines(image_feats, domain_feats, base_feat)
    return cos - base_cos[:, None]


def _cosines(image_feats, domain_feats, base_feat) -> tuple[torch.Tensor, torch.Tensor]:
    if image_feats.ndim != 2 or domain_feats.ndim != 2:
        raise ValueError(f"image_feats must be [N, E] and domain_feats [D, E], got "
                         f"{tuple(image_feats.shape)} and {tuple(domain_feats.shape)}")
    base_feat = base_feat.reshape(-1)
    if not (image_feats.shape[1] == domain_feats.shape[1] == base_feat.shape[0]):
        raise ValueError(f"feature sizes differ: images {image_feats.shape[1]}, domains "
                         f"{domain_feats.shape[1]}, base {base_feat.shape[0]}")
    x = F.normalize(image_feats.float(), dim=-1)
    t = F.normalize(domain_feats.float().to(x.device), dim=-1)
    b = F.normalize(base_feat.float().to(x.device), dim=0)
    return x @ t.t(), x @ b  # [N, D], [N]


def pseudo_labels(image_feats: torch.Tensor, domain_feats: torch.Tensor, base_feat: torch.Tensor,
                  mode: str = "adaptive", topk: int = 1, threshold: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-hot labels [N, D] (float 0/1) and `domain_scores` [N, D] (see the module docstring).

    Rows of `image_feats` that are not finite (unreadable images) get no active domain."""
    cos, base_cos = _cosines(image_feats, domain_feats, base_feat)
    scores = cos - base_cos[:, None]
    valid = torch.isfinite(scores).all(dim=1)  # [N]
    D = scores.shape[1]
    if mode == "adaptive":
        on = scores > 0
    elif mode in TOPK_MODES:
        if not 1 <= int(topk) <= D:
            raise ValueError(f"topk must be in [1, {D}] for {D} domains, got {topk}")
        ranked = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -math.inf))
        on = torch.zeros_like(scores, dtype=torch.bool)
        on.scatter_(1, ranked.topk(int(topk), dim=1).indices, True)
        if mode == "adaptive-topk":
            on &= scores > 0
    elif mode == "threshold":
        on = cos > float(threshold)
    else:
        raise ValueError(f"unknown pseudo-label mode {mode!r}; choose one of {LABEL_MODES}")
    on &= valid[:, None]
    return on.float(), scores


def label_counts(labels: torch.Tensor, domains: Sequence[str]) -> dict[str, int]:
    """Images per domain, plus "(none)": images with no active domain (LANIT's slack)."""
    counts = {d: int(c) for d, c in zip(domains, (labels > 0).sum(dim=0).tolist())}
    counts["(none)"] = int(((labels > 0).sum(dim=1) == 0).sum())
    return counts


# ----------------------------------------------------------------------------- image features

def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """Decode any image to RGB (transparency on white, as training/data.py), scale the short side
    to `size` (bicubic), crop the centre: float [3, size, size] in [-1, 1]."""
    from training.data import load_rgb, resize_center_crop, to_uint8

    img = resize_center_crop(load_rgb(path), size)
    return to_uint8(img).float() / 127.5 - 1.0


def _file_entry(path: str | os.PathLike) -> tuple[str, int, int]:
    resolved = str(Path(path).expanduser().resolve())
    try:
        st = os.stat(resolved)
        return resolved, int(st.st_size), int(st.st_mtime_ns)
    except OSError:
        return resolved, -1, -1


def feature_cache_path(vl, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike) -> Path:
    """The cache file for this model and this image set: a hash of the model identity (name,
    preprocessing, weight fingerprint) and the sorted (absolute path, size, mtime) of the files."""
    entries = sorted(set(_file_entry(p) for p in paths))
    return _cache_file(vl, entries, cache_dir)


def _cache_file(vl, entries: list[tuple[str, int, int]], cache_dir) -> Path:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, vl.name, vl.identity, entries]).encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", vl.name)[-40:].strip("_") or "model"
    return Path(cache_dir).expanduser() / f"{slug}-{h.hexdigest()[:24]}.safetensors"


def image_features(vl, paths: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None,
                   batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """L2-normalised features [N, E] (fp32, CPU) of the images at `paths`, in order.

    For a labeler that centres images (lanit-lite, see `VisionLanguage.set_image_centre`) a
    centre made from the set's mean embedding is removed first and stays the labeler's centre for
    later encodings.

    Computed once per (model, image set) and stored under `cache_dir` (None: no cache). The cache
    key covers every file's absolute path, size and modification time, so editing, adding or
    removing a file recomputes. Unreadable files give a NaN row and a warning (see the module
    docstring); if none is readable `ImageFeatureError` is raised.
    """
    if len(paths) == 0:
        raise ImageFeatureError("no image paths given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    entries = [_file_entry(p) for p in paths]
    unique = sorted(set(entries))
    row_of = {e: i for i, e in enumerate(unique)}
    cache_file = _cache_file(vl, unique, cache_dir) if cache_dir is not None else None

    loaded = _read_cache(cache_file) if cache_file is not None else None
    if loaded is not None and loaded[0].shape[0] == len(unique):
        feats, failed = loaded
    else:
        feats, failed = _encode_files(vl, [e[0] for e in unique], batch_size, progress)
        if cache_file is not None:
            _write_cache(cache_file, feats, failed, vl, unique)
    if failed:
        shown = list(failed.items())[:10]
        for path, why in shown:
            warnings.warn(f"skipping unreadable image {path} ({why})", stacklevel=2)
        if len(failed) > len(shown):
            warnings.warn(f"... and {len(failed) - len(shown)} more unreadable images", stacklevel=2)
        if len(failed) == len(unique):
            raise ImageFeatureError(f"none of the {len(unique)} images could be read "
                                    f"(first: {shown[0][0]}: {shown[0][1]})")
    index = torch.tensor([row_of[e] for e in entries], dtype=torch.long)
    vl.set_image_centre(feats)
    return vl.normalize_features(feats)[index]


def _encode_files(vl, paths: list[str], batch_size: int, progress: bool
                  ) -> tuple[torch.Tensor, dict[str, str]]:
    feats = torch.full((len(paths), vl.embed_dim), math.nan, dtype=torch.float32)
    failed: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc=f"image features ({vl.name})", unit="img", disable=not progress,
               leave=False)
    with bar, torch.no_grad():
        for start in range(0, len(paths), batch_size):
            rows, images = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(load_image(paths[i], vl.image_size))
                    rows.append(i)
                except _DECODE_ERRORS as err:
                    failed[paths[i]] = f"{type(err).__name__}: {err}"
            if images:
                batch = torch.stack(images)
                step = CPU_MICRO_BATCH if vl.device.type == "cpu" else len(batch)
                out = torch.cat([vl.encode_images(batch[i:i + step], raw=True, views=vl.label_views)
                                 for i in range(0, len(batch), step)])  # [B, E]
                feats[torch.tensor(rows)] = out.float().cpu()
            bar.update(min(batch_size, len(paths) - start))
    return feats, failed


def _read_cache(path: Path) -> tuple[torch.Tensor, dict[str, str]] | None:
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                return None
            return f.get_tensor("features").float(), json.loads(meta.get("failed", "{}"))
    except Exception as err:  # a truncated or foreign file is recomputed, never trusted
        warnings.warn(f"ignoring unreadable feature cache {path} ({type(err).__name__}: {err})", stacklevel=3)
        return None


def _write_cache(path: Path, feats: torch.Tensor, failed: dict[str, str], vl,
                 entries: list[tuple[str, int, int]]) -> None:
    """Store the features; a cache that cannot be written (the folder is a file, read-only, full)
    costs a recomputation next time, never the features just computed: one warning, no error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from lanit_rt.checkpoint import atomic_write

    meta = {"format": CACHE_FORMAT, "model": vl.name, "identity": vl.identity,
            "paths": json.dumps([e[0] for e in entries]), "failed": json.dumps(failed)}
    try:
        atomic_write(path, lambda tmp: save_file({"features": feats.contiguous()}, tmp, metadata=meta))
    except (OSError, SafetensorError) as err:
        warnings.warn(f"cannot write the image-feature cache {path} ({type(err).__name__}: {err}); "
                      f"continuing without it", stacklevel=3)


# ----------------------------------------------------------------------------- label tables

def scores_json_path(csv_path: str | os.PathLike) -> Path:
    """`labels.csv` -> `labels_scores.json` (the scores table beside a labels CSV)."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + "_scores.json")


def write_labels_csv(path: str | os.PathLike, paths: Sequence[str | os.PathLike], domains: Sequence[str],
                     labels: torch.Tensor, scores: torch.Tensor, meta: dict[str, Any] | None = None) -> None:
    """Write the label table: CSV with columns `path` then one 0/1 column per domain (in order),
    and beside it `<stem>_scores.json` = {"domains": [...], "scores": {path: [D floats or null]},
    "meta": {...}}. Both files are written atomically."""
    from lanit_rt.checkpoint import atomic_write_text

    domains = [str(d) for d in domains]
    labels = torch.as_tensor(labels).detach().cpu()
    scores = torch.as_tensor(scores).detach().cpu().float()
    n = len(paths)
    if labels.shape != (n, len(domains)) or scores.shape != (n, len(domains)):
        raise ValueError(f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} must both be "
                         f"[{n}, {len(domains)}] for {n} paths and {len(domains)} domains")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0/1")
    if len(set(domains)) != len(domains) or "path" in domains:
        raise ValueError(f"domain names must be unique and not 'path', got {domains}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *domains])
    for p, row in zip(paths, labels.to(torch.int64).tolist()):
        writer.writerow([str(p), *row])
    atomic_write_text(path, buf.getvalue())
    table = {str(p): [None if not math.isfinite(v) else round(v, 6) for v in row]
             for p, row in zip(paths, scores.tolist())}
    doc = {"domains": domains, "score": "cos(x, domain) - cos(x, base)", "scores": table, "meta": meta or {}}
    atomic_write_text(scores_json_path(path), json.dumps(doc, indent=1) + "\n")


def read_labels_csv(path: str | os.PathLike) -> tuple[list[str], list[str], torch.Tensor]:
    """(paths, domains, labels [N, D] float 0/1) from a CSV written by `write_labels_csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["path"] or len(rows[0]) < 2:
        raise ValueError(f"{path}: not a label table (first column must be 'path')")
    domains = rows[0][1:]
    try:
        labels = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]], dtype=torch.float32)
    except ValueError as err:
        raise ValueError(f"{path}: non-numeric label ({err})") from None
    if any(len(r) != len(domains) + 1 for r in rows[1:]):
        raise ValueError(f"{path}: every row needs a path and {len(domains)} labels")
    return [r[0] for r in rows[1:]], domains, labels.reshape(-1, len(domains))
