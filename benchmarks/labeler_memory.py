"""Would a label-time memory of the training drawings help lanit-lite label an unseen vendor?

    python benchmarks/labeler_memory.py [--heads default] [--memory-vendors openmoji,noto]
        [--vendor twemoji] [--out benchmarks/results/labeler_memory.json]

Why: the committed heads put every training drawing of the animal-face and food classes on its
caption, yet label held-out Twemoji at 0.50 / 0.67 top-1, while a Twemoji image's nearest training
drawing in the frozen trunk space has the right class for 0.83 / 1.00 of them
(`labeler_ablation.py --nn`). This bench measures a retrieval-augmented score that uses that, in
the spirit of SuS-X and Tip-Adapter (a support set found through text, compared in image space):

    score(x, d) = (1 - a) * text score(x, d) + a * memory score(x, d)

- text score: the adaptive score that labelling uses (cos to the domain minus cos to the base);
- memory score: the K training views whose projected embeddings lie nearest to domain d's text
  features (the heads' own joint space, where they are almost always right) are compared with x
  in the pooled trunk space (centred as labelling centres, no projection) and reduced to one
  number: their largest cosine ("max"), the mean of their three largest ("top3") or the cosine
  with their mean ("mean"); then double-centred: the image's mean over the domains and the
  domain's mean over the set are removed, so that the memory moves rankings, not the base rule.

One run scores one split: heads (`--heads`), a memory of those vendors' views (`--memory-vendors`,
from align's cached renders) and an evaluation vendor (`--vendor`). The honest protocol chooses a,
K and the reduction on validation splits and only then looks at Twemoji:

    python -m training.align --vendors openmoji --out runs/om/heads.safetensors
    python -m training.align --vendors noto --out runs/noto/heads.safetensors
    python benchmarks/labeler_memory.py --heads runs/om/heads.safetensors --memory-vendors openmoji --vendor noto
    python benchmarks/labeler_memory.py --heads runs/noto/heads.safetensors --memory-vendors noto --vendor openmoji
    python benchmarks/labeler_memory.py          # committed heads, both vendors' memory, Twemoji

Every run adds its split to the JSON file and prints the grid ranked by the mean gain over the
validation splits on record (persons macro F1 + animal-face top-1 + food top-1, each against the
same split's text-only row), beside the Twemoji columns when those are on record too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import labeler_ablation as ablation  # noqa: E402
from bench_machine import describe  # noqa: E402
from training.labeling import align as A  # noqa: E402
from training.labeling import emoji as emoji_data  # noqa: E402
from training.evaluation.eval_labeler import f1_scores, top1_accuracy  # noqa: E402
from training.labeling.lanit_lite import DEFAULT_HEADS, IMAGE_CENTRE_KEY, heads_vendors, read_heads  # noqa: E402
from training.labeling.prompts import PromptBank  # noqa: E402
from training.labeling.pseudo_labels import pseudo_labels  # noqa: E402
from training.labeling.vl import load_vision_language  # noqa: E402

REDUCTIONS = ("max", "top3", "mean")
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)
NEIGHBOURS = (4, 8, 16, 32)
METRICS = ("persons_f1", "persons_auc", "hair_top1", "animal_top1", "food_top1")
GAIN = ("persons_f1", "animal_top1", "food_top1")


def memory_scores(images: torch.Tensor, texts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  k: int, reduction: str) -> torch.Tensor:
    """Double-centred memory scores [N, D].

    images [N, F]: unit-norm centred trunk features of the set; texts [D, E]: unit-norm domain text
    features; keys [M, E]: unit-norm projected embeddings of the memory views (retrieved by text);
    values [M, F]: their unit-norm centred trunk features (compared with the images)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    nearest = (texts @ keys.t()).topk(k, dim=1).indices  # [D, K]
    if reduction == "mean":
        s = images @ F.normalize(values[nearest].mean(1), dim=1).t()
    else:
        sims = torch.einsum("nf,dkf->ndk", images, values[nearest])
        s = sims.amax(2) if reduction == "max" else sims.topk(min(3, k), dim=2).values.mean(2)
    return s - s.mean(1, keepdim=True) - s.mean(0, keepdim=True) + s.mean()


class Split:
    """One evaluation vendor's three sets, scored by one set of heads with one memory."""

    def __init__(self, heads: str, memory_vendors: list[str], vendor: str) -> None:
        heads_path = DEFAULT_HEADS if heads == "default" else Path(heads)
        self.vl = load_vision_language("lanit-lite" if heads == "default" else f"lanit-lite:{heads}")
        self.proj = self.vl.model.visual.head.proj
        self.raw_centre = read_heads(heads_path)[0][IMAGE_CENTRE_KEY].float()
        cfg = A.AlignConfig()
        glyphs = A.collect_glyphs(cfg)
        parts = ablation.training_parts(cfg, self.vl.model, glyphs)
        feats = ablation.joined(parts)
        keep = [g.vendor in memory_vendors for g in glyphs]
        if not any(keep):
            raise SystemExit(f"no training glyphs of {memory_vendors}; align renders {cfg.vendors}")
        rows = torch.tensor([i * cfg.views + v for i, on in enumerate(keep) if on for v in range(cfg.views)])
        centred, _ = A.centre_per_vendor(feats[rows], [g for g, on in zip(glyphs, keep) if on], cfg.views)
        with torch.no_grad():
            self.keys = F.normalize(self.proj(centred), dim=1)
        self.values = F.normalize(centred, dim=1)
        self.sets = {}
        test = ablation.vendor_parts(self.vl, Path(cfg.cache_dir).expanduser(), vendor)
        w = self.vl.set_centre_weight
        for name in ("persons", "animal faces", "food"):
            entry = test[name]
            x = ablation.joined(entry["parts"])
            with torch.no_grad():  # text scores exactly as labelling makes them
                raw = self.proj(x)
                self.vl.set_image_centre(raw)
                text, base = PromptBank(self.vl, entry["domains"], templates="emoji")()
                text_scores = pseudo_labels(self.vl.normalize_features(raw), text, base, mode="adaptive")[1]
                # The same centre in trunk space, where the memory compares (the projection is linear).
                shift = w * x.mean(0) + (1 - w) * self.raw_centre
                torch.testing.assert_close(self.proj(shift), self.vl.image_shift, rtol=1e-4, atol=1e-4)
            self.sets[name] = dict(trunk=F.normalize(x - shift, dim=1), text=F.normalize(text, dim=1),
                                   text_scores=text_scores, domains=list(entry["domains"]), truth=entry["truth"])

    def memory(self, k: int, reduction: str) -> dict[str, torch.Tensor]:
        """Each set's `memory_scores` (independent of the weight a)."""
        return {name: memory_scores(s["trunk"], s["text"], self.keys, self.values, k, reduction)
                for name, s in self.sets.items()}

    def evaluate(self, a: float = 0.0, memory: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The figures of `(1 - a) * text scores + a * memory` (text scores alone when a = 0)."""
        out = {}
        for name, s in self.sets.items():
            scores = s["text_scores"]
            if a > 0:
                scores = (1 - a) * scores + a * memory[name]
            truth = s["truth"]
            if name == "persons":
                hair = [s["domains"].index(d) for d in emoji_data.PERSON_DOMAINS]
                out.update(persons_f1=float(f1_scores(scores > 0, truth).mean()),
                           persons_auc=ablation.mean_auc(scores, truth),
                           hair_top1=top1_accuracy(scores, truth, hair))
            else:
                out[f"{name.split()[0]}_top1"] = top1_accuracy(scores, truth)
        return out


def grid(split: Split) -> list[dict]:
    rows = [dict(a=0.0, k=0, reduction="-", **split.evaluate())]
    for reduction in REDUCTIONS:
        for k in NEIGHBOURS:
            memory = split.memory(k, reduction)
            for a in WEIGHTS:
                rows.append(dict(a=a, k=k, reduction=reduction, **split.evaluate(a, memory)))
    return rows


def config(row: dict) -> tuple:
    return row["a"], row["k"], row["reduction"]


def is_test(split_name: str) -> bool:
    return split_name.endswith("-> twemoji")


def ranked(splits: dict[str, list[dict]]) -> list[tuple[float, tuple]]:
    """Configurations by mean GAIN sum over the validation splits (all but Twemoji)."""
    validation = [name for name in splits if not is_test(name)] or list(splits)
    gains: dict[tuple, list[float]] = {}
    for name in validation:
        base = next(r for r in splits[name] if r["a"] == 0)
        for row in splits[name]:
            gains.setdefault(config(row), []).append(sum(row[m] - base[m] for m in GAIN))
    return sorted(((sum(g) / len(g), c) for c, g in gains.items() if len(g) == len(validation)), reverse=True)


def report(splits: dict[str, list[dict]], top: int = 12) -> str:
    validation = [name for name in splits if not is_test(name)]
    twemoji = next(({config(r): r for r in rows} for name, rows in splits.items() if is_test(name)), None)
    header = "| a | K | reduction | mean validation gain |"
    if twemoji:
        header += " Twemoji " + " | ".join(METRICS) + " |"
    lines = [f"validation splits: {', '.join(validation) or '(none: ranked on Twemoji)'}", header,
             "|" + "---|" * (header.count("|") - 1)]
    order = ranked(splits)
    chosen = [c for c in order if c[1][0] == 0] + [c for c in order if c[1][0] != 0][:top]
    for gain, key in chosen:
        line = "| {:g} | {} | {} | ".format(*key) + f"{gain:+.3f} |"
        if twemoji:
            line += " " + " | ".join(f"{twemoji[key][m]:.3f}" for m in METRICS) + " |"
        lines.append(line)
    return "\n".join(lines)


def check_split(parser: argparse.ArgumentParser, heads: str, memory_vendors: list[str], vendor: str) -> None:
    """A split scores a vendor that neither the heads nor the memory saw; anything else would rank
    configurations by their fit to training drawings (and be kept as a validation split)."""
    if heads != "default" and not Path(heads).expanduser().is_file():
        parser.error(f"--heads {heads}: no such heads file")
    unknown = sorted(set(memory_vendors) - {"openmoji", "noto"})
    if unknown or not memory_vendors:
        parser.error(f"--memory-vendors: openmoji and/or noto (align's vendors), got "
                     f"{','.join(memory_vendors) or 'nothing'}")
    trained = heads_vendors("lanit-lite" if heads == "default" else f"lanit-lite:{heads}")
    if vendor in trained or vendor in memory_vendors:
        parser.error(f"--vendor {vendor}: the heads ({', '.join(trained) or '?'}) or the memory "
                     f"({', '.join(memory_vendors)}) were made from its drawings; score another vendor")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default="default", help="'default' (the committed heads) or a heads file")
    parser.add_argument("--memory-vendors", default="openmoji,noto",
                        help="training vendors whose cached views form the memory")
    parser.add_argument("--vendor", default="twemoji", choices=("twemoji", "openmoji", "noto"),
                        help="the vendor scored (one that the heads did not see)")
    parser.add_argument("--out", default="benchmarks/results/labeler_memory.json")
    args = parser.parse_args(argv)
    memory_vendors = [v for v in args.memory_vendors.split(",") if v]
    check_split(parser, args.heads, memory_vendors, args.vendor)
    torch.set_num_threads(2)
    name = f"{args.heads} + {'/'.join(memory_vendors)} memory -> {args.vendor}"
    rows = grid(Split(args.heads, memory_vendors, args.vendor))
    # the split's machine record rides on its first row (text only), not on each of the grid's rows
    rows[0]["machine"] = describe("labeler_memory.py", argv, torch.get_num_threads(), "open_clip")
    out = Path(args.out)
    splits = json.loads(out.read_text()) if out.is_file() else {}
    splits[name] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(splits, indent=1) + "\n")
    base = rows[0]
    print(f"{name}: text only " + ", ".join(f"{m} {base[m]:.3f}" for m in METRICS))
    print(report(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
