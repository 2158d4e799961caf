"""Ablations of lanit-lite's head training: one table row per run, seconds to minutes each.

    python benchmarks/labeler_ablation.py [--pool pyramid] [--steps 3000] [--seed 0]
        [--weight-decay 1e-4] [--feature-dropout 0] [--set-centre-weight 0.5]
        [--image-side learned|locked] [--nap 0] [--embed-dim 256] [--nn]
        [--out benchmarks/results/labeler_ablation.json]

Heads are trained with `python -m training.align`'s own loss and loop (`align.train_heads`) on
`align`'s cached trunk features (the first run fills the cache, ~12 min on 2 cores), pooled as
`--pool` says; held-out Twemoji is then scored from cached features of the same trunk, as
`python -m training.eval_labeler` scores it (adaptive rule, "emoji" templates, the labelling centre
`w * set mean + (1 - w) * training centre`), plus the ranking and retrieval figures that it does
not report:
- persons: macro F1, mean per-domain ROC AUC of the adaptive scores, hair and gender top-1;
- animal faces and food: top-1;
- names: zero-shot top-1 over the 1,907 emoji names of all 3,939 Twemoji images;
- `--nn`: the image-only diagnosis, the class of each animal / food image's nearest training
  drawing (centred pooled features, no heads), at w and at w = 1.
Pools (of the trunk's head `H`, its last stage `L` and the stage before it `P`):
avg = avg(H) (open_clip's own), avg+max, pyramid = avg(H), max(H), avg(L), avg(P) (the committed
heads), pyramid+halves (avg of H's top and bottom halves as well), pyramid+centre (avg of H's
central 3x3 as well).
Two fixed linear maps of the centred pooled features, both bias-free so that labelling's centring
goes through them unchanged:
- `--image-side locked`: LiT's locked image side. The image projection is fixed to the leading
  `embed_dim` principal directions of the centred training features (scaled to unit mean norm)
  and only the text head, temperature and bias train.
- `--nap K`: nuisance attribute projection. The K leading principal directions of the differences
  between the two vendors' drawings of the same emoji (means over views) are projected out before
  the trained projection, so that the heads cannot use what tells the vendors apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_machine import describe  # noqa: E402
from training.labeling import align as A  # noqa: E402
from training.labeling import align_data as AD  # noqa: E402
from training.labeling import emoji as emoji_data  # noqa: E402
from training.evaluation.eval_labeler import eval_sets, f1_scores, top1_accuracy  # noqa: E402
from training.labeling.lanit_lite import create_lanit_lite  # noqa: E402
from training.labeling.vl import VisionLanguage  # noqa: E402

POOLS = {
    "avg": ("avg",),
    "avg+max": ("avg", "max"),
    "pyramid": ("avg", "max", "last", "before"),
    "pyramid+halves": ("avg", "max", "last", "before", "top", "bottom"),
    "pyramid+centre": ("avg", "max", "last", "before", "centre"),
}
PARTS = ("avg", "max", "last", "before", "top", "bottom", "centre")


@torch.no_grad()
def pooled_parts(trunk: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every pooled part of one batch of trunk features `h` (the input of the last stage)."""
    last = trunk.blocks[-1](h)
    head = trunk.bn2(trunk.conv_head(last))
    rows = head.shape[2]
    return {"avg": head.mean((2, 3)), "max": head.amax((2, 3)), "last": last.mean((2, 3)),
            "before": h.mean((2, 3)), "top": head[:, :, :(rows + 1) // 2].mean((2, 3)),
            "bottom": head[:, :, rows // 2:].mean((2, 3)), "centre": head[:, :, 2:-2, 2:-2].mean((2, 3))}


def parts_of(trunk: nn.Module, h_batches) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in PARTS}
    for h in h_batches:
        for key, value in pooled_parts(trunk, h.float()).items():
            out[key].append(value.half())
    return {k: torch.cat(v) for k, v in out.items()}


def joined(parts: dict[str, torch.Tensor], pool: str = "pyramid") -> torch.Tensor:
    """The fp32 features [N, C] of `pool`: its pooled parts side by side."""
    return torch.cat([parts[k].float() for k in POOLS[pool]], dim=1)


def vendor_parts(vl, cache_dir: Path, vendor: str = "twemoji") -> dict[str, dict]:
    """Pooled parts of the three evaluation sets of `vendor` (and, for Twemoji, of all its images,
    for name retrieval), from the images as labelling loads and preprocesses them. Training vendors
    are rendered as `eval_sets` renders them (validation for heads trained without that vendor)."""
    from training.labeling.pseudo_labels import load_image

    tower = A.SplitImageTower(vl.model.visual, 0)

    def encode(paths):
        def batches():
            for i in range(0, len(paths), 64):
                images = torch.stack([load_image(p, vl.image_size) for p in paths[i:i + 64]])
                yield tower.features(vl.preprocess(images).contiguous(memory_format=torch.channels_last))
        return parts_of(vl.model.visual.trunk, batches())

    def make():
        render_dir = None if vendor == "twemoji" else cache_dir / f"render-{vendor}"
        out = {name: {"parts": encode(paths), "domains": domains, "truth": truth}
               for name, (paths, domains, truth) in eval_sets(vendor, render_dir).items()}
        if vendor == "twemoji":
            entries = emoji_data.twemoji_entries()
            out["all"] = {"parts": encode([e.path for e in entries]), "names": [e.name for e in entries]}
        return out

    return A._cached(cache_dir / f"{vendor}-parts-{vl.image_size}.pt", make)


def training_parts(cfg, model, glyphs) -> dict[str, torch.Tensor]:
    """Pooled parts of align's cached training views ([G * views, C] per part, glyph-major),
    computed once from align's trunk cache (which the first call fills, ~12 min on 2 cores)."""
    h = A.trunk_cache(cfg, A.SplitImageTower(model.visual, 0), glyphs, time.time())
    key = A._cache_key({"glyphs": len(glyphs), "rows": len(h), "sum": float(h[:64].float().sum())})
    return A._cached(Path(cfg.cache_dir).expanduser() / f"train-parts-{key}.pt",
                     lambda: parts_of(model.visual.trunk, (h[i:i + 1024] for i in range(0, len(h), 1024))))


class TrainingDropout(nn.Module):
    """Dropout while gradients are on. `align.train_heads` keeps the model in eval mode (frozen
    BatchNorm), which would switch an nn.Dropout off."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=torch.is_grad_enabled()) if self.p else x


class FixedLinear(nn.Module):
    """x @ weight.T with a fixed weight (a buffer, so `align.train_heads` leaves it alone)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def principal_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading eigenvectors [k, F] of the second-moment matrix of the rows of x."""
    x = x.double()
    evals, evecs = torch.linalg.eigh(x.t() @ x / len(x))
    return evecs[:, evals.argsort(descending=True)[:k]].t().float()


def locked_projection(feats: torch.Tensor, dim: int) -> FixedLinear:
    """LiT's locked image side: the leading `dim` principal directions of the centred features,
    scaled so that the projected training rows have unit mean norm."""
    weight = principal_directions(feats.float(), dim)
    return FixedLinear(weight / (feats.float() @ weight.t()).norm(dim=1).mean())


def nuisance_projection(feats: torch.Tensor, glyphs, views: int, k: int) -> FixedLinear:
    """I - U U^T for the k leading directions U of (vendor A drawing - vendor B drawing) over the
    emoji that two vendors both draw (rows glyph-major, `views` per glyph, means over views)."""
    per_glyph = feats.float().view(len(glyphs), views, -1).mean(1)
    rows: dict[str, dict[str, int]] = {}
    for i, g in enumerate(glyphs):
        rows.setdefault(g.vendor, {})[g.sequence] = i
    if len(rows) != 2:
        raise SystemExit(f"--nap needs exactly two training vendors, got {sorted(rows)}")
    first, second = rows.values()
    common = sorted(set(first) & set(second))
    diffs = per_glyph[[first[q] for q in common]] - per_glyph[[second[q] for q in common]]
    u = principal_directions(diffs, k)
    return FixedLinear(torch.eye(feats.shape[1]) - u.t() @ u)


def scores(vl, proj: nn.Module, feats: torch.Tensor, domains) -> torch.Tensor:
    """Adaptive scores of one set's pooled features, as labelling makes them: projected, centred
    by the labeler's own set centre (`VisionLanguage.set_image_centre`), then `pseudo_labels`."""
    from training.labeling.prompts import PromptBank
    from training.labeling.pseudo_labels import pseudo_labels

    with torch.no_grad():
        raw = proj(feats)
        vl.set_image_centre(raw)
        domain_feats, base_feat = PromptBank(vl, domains, templates="emoji")()
        return pseudo_labels(vl.normalize_features(raw), domain_feats, base_feat, mode="adaptive")[1]


def mean_auc(s: torch.Tensor, truth: torch.Tensor) -> float:
    aucs = []
    for k in range(truth.shape[1]):
        pos, neg = s[truth[:, k] > 0, k], s[truth[:, k] == 0, k]
        aucs.append(float(((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean()))
    return sum(aucs) / len(aucs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default="pyramid", choices=sorted(POOLS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="head initialisation and batches (renders: seed 0)")
    parser.add_argument("--weight-decay", type=float, default=A.AlignConfig.weight_decay)
    parser.add_argument("--feature-dropout", type=float, default=0.0)
    parser.add_argument("--set-centre-weight", type=float, default=A.AlignConfig.set_centre_weight)
    parser.add_argument("--image-side", default="learned", choices=("learned", "locked"),
                        help="locked: image projection fixed to the features' principal directions")
    parser.add_argument("--nap", type=int, default=0,
                        help="project out this many leading cross-vendor difference directions first")
    parser.add_argument("--embed-dim", type=int, default=A.AlignConfig.embed_dim)
    parser.add_argument("--nn", action="store_true", help="also the nearest-training-drawing diagnosis")
    parser.add_argument("--out", default="benchmarks/results/labeler_ablation.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.embed_dim < 1 or args.nap < 0:
        parser.error("--steps and --embed-dim must be at least 1, --nap at least 0")
    if not 0 <= args.set_centre_weight <= 1 or not 0 <= args.feature_dropout < 1:
        parser.error("--set-centre-weight must be in [0, 1] and --feature-dropout in [0, 1)")
    torch.set_num_threads(2)

    cfg = A.AlignConfig(steps=args.steps, seed=0, weight_decay=args.weight_decay, log_every=1000,
                        embed_dim=args.embed_dim)
    arch = cfg.arch()
    model, tokenizer, _ = create_lanit_lite(heads=None, arch=arch, seed=args.seed)
    cache_dir = Path(cfg.cache_dir).expanduser()
    glyphs = A.collect_glyphs(cfg)
    train_parts = training_parts(cfg, model, glyphs)

    def join(parts):
        return joined(parts, args.pool)

    feats, centre = A.centre_per_vendor(join(train_parts), glyphs, cfg.views)
    torch.manual_seed(args.seed)
    layers = OrderedDict(drop=TrainingDropout(args.feature_dropout))
    if args.nap:
        layers["nap"] = nuisance_projection(feats, glyphs, cfg.views, args.nap)
    if args.image_side == "locked":
        layers["proj"] = locked_projection(layers["nap"](feats) if args.nap else feats, arch.embed_dim)
    else:
        layers["proj"] = nn.Linear(feats.shape[1], arch.embed_dim, bias=False)
    # `proj` below is the whole map from centred features to the embedding.
    proj = model.visual.head = nn.Sequential(layers)
    index = AD.build_captions([g.name for g in glyphs], [emoji_data.aliases(g.sequence) for g in glyphs])
    text_feats = A.cached_text_features(cache_dir, model, tokenizer, index.captions)
    data = A.AlignData(model, A.SplitImageTower(model.visual, 0), glyphs, feats.half(), centre, index,
                       text_feats, time.time())
    summary = A.train_heads(replace(cfg, seed=args.seed), data)  # renders stay those of seed 0

    w = args.set_centre_weight
    with torch.no_grad():  # the bias-free projection maps the training centre into the embedding
        shift = proj(centre)
    vl = VisionLanguage(model, tokenizer, arch.image_size, arch.mean, arch.std, name="ablation",
                        centre_images=True, image_shift=shift, set_centre_weight=w)
    test = vendor_parts(vl, cache_dir)
    row: dict = {"pool": args.pool, "steps": args.steps, "seed": args.seed, "weight_decay": args.weight_decay,
                 "feature_dropout": args.feature_dropout, "set_centre_weight": w,
                 "image_side": args.image_side, "nap": args.nap, "embed_dim": args.embed_dim,
                 "train_seconds": summary["seconds"],
                 "machine": describe("labeler_ablation.py", argv, torch.get_num_threads(), "open_clip",
                                     "transformers")}
    persons = test["persons"]
    s = scores(vl, proj, join(persons["parts"]), persons["domains"])
    truth = persons["truth"]
    domains = list(persons["domains"])
    row["persons_f1"] = float(f1_scores(s > 0, truth).mean())
    row["persons_auc"] = mean_auc(s, truth)
    row["hair_top1"] = top1_accuracy(s, truth, [domains.index(d) for d in emoji_data.PERSON_DOMAINS])
    row["gender_top1"] = top1_accuracy(s, truth, [domains.index("man"), domains.index("woman")])
    for name in ("animal faces", "food"):
        entry = test[name]
        entry_scores = scores(vl, proj, join(entry["parts"]), entry["domains"])
        row[f"{name.split()[0]}_top1"] = top1_accuracy(entry_scores, entry["truth"])
    row["names_top1"] = name_retrieval(vl, proj, join(test["all"]["parts"]), test["all"]["names"], glyphs)
    if args.nn:
        row["nearest_drawing"] = nearest_drawing(test, join, feats, centre, glyphs, cfg.views, w)

    print("| pool | steps | seed | wd | dropout | w | image side | nap | dim | persons F1 | AUC | hair | gender "
          "| animals | food | names |")
    print("|" + "---|" * 16)
    print(f"| {args.pool} | {args.steps} | {args.seed} | {args.weight_decay:g} | {args.feature_dropout:g} | {w:g} | "
          f"{args.image_side} | {args.nap} | {args.embed_dim} | "
          + " | ".join(f"{row[k]:.3f}" for k in ("persons_f1", "persons_auc", "hair_top1", "gender_top1",
                                                  "animal_top1", "food_top1", "names_top1")) + " |")
    if args.nn:
        print("nearest training drawing, top-1:", row["nearest_drawing"])
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows + [row], indent=1) + "\n")
    return 0


def name_retrieval(vl, proj, feats, names, glyphs) -> float:
    """Zero-shot top-1 over the distinct emoji names that training saw (skin tones folded)."""
    base = [emoji_data.strip_skin_tone(n) for n in names]
    known = sorted({emoji_data.strip_skin_tone(g.name) for g in glyphs} & set(base))
    keep = torch.tensor([b in set(known) for b in base])
    target = torch.tensor([known.index(b) for b in base if b in set(known)])
    with torch.no_grad():
        texts = torch.cat([vl.encode_texts([f"an emoji of {AD.caption_phrase(n)}." for n in known[i:i + 512]])
                           for i in range(0, len(known), 512)])
        x = F.normalize(proj(feats[keep] - feats[keep].mean(0)), dim=-1)
    return float(((x @ texts.t()).argmax(1) == target).float().mean())


def nearest_drawing(test, join, train_feats, centre, glyphs, views, w) -> dict[str, float]:
    """Top-1 of the class of each Twemoji image's nearest training drawing of the set's classes."""
    out = {}
    for name, class_of in (("animal faces", emoji_data.animal_face_class), ("food", emoji_data.food_class)):
        entry = test[name]
        domains = list(entry["domains"])
        chosen = [(i, class_of(g.name)) for i, g in enumerate(glyphs) if class_of(g.name) is not None]
        rows = torch.tensor([i * views + v for i, _ in chosen for v in range(views)])
        labels = torch.tensor([domains.index(c) for _, c in chosen for _ in range(views)])
        feats = join(entry["parts"])
        for weight in (w, 1.0):
            query = F.normalize(feats - (weight * feats.mean(0) + (1 - weight) * centre), dim=1)
            nearest = labels[(query @ F.normalize(train_feats[rows].float(), dim=1).t()).argmax(1)]
            out[f"{name} (w={weight:g})"] = float((nearest == entry["truth"].argmax(1)).float().mean())
    return out


if __name__ == "__main__":
    sys.exit(main())
