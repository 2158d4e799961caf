"""What the content figure measures on the embedded default data, and whether sources survive.

training.eval's content preservation is the cosine of lanit-lite features, source vs translation
(centred on the image set's mean, as lanit-lite labels).
This probe puts it beside two references, for trained run folders of the embedded Twemoji set:

- what the same cosine gives for the sources themselves, degraded (2x blurred; Gaussian noise) or
  swapped for another random source, and for each model's own-domain reconstruction (the source
  rendered in a latent style of its own domain): the figure's ceiling for an imperfect generator;
- the face-centre colour error: the mean |RGB| difference, in 0-255 units, between the average
  colour of a central patch (rows 40-60 %, columns 28-72 %: cheeks, eyes, nose) of each source and
  of its latent translations. The persons are centred emoji faces, so the patch is skin: this says
  whether a translation keeps its source's skin tone (a random other source gives the chance level).

Translations follow training.eval: per target domain, 50 sources outside it, seeded latents, the EMA
networks. Runs that have an eval.json add its domain accuracy, content and mFD to the table.

    python benchmarks/translation_probe.py RUN [RUN ...] [--n 50] [--json benchmarks/results/translation_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_machine import describe  # noqa: E402

PATCH_ROWS, PATCH_COLS = (0.40, 0.60), (0.28, 0.72)


def centre_colour(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> the central patch's mean colour, [N, 3] in 0-255 units."""
    h, w = images.shape[-2:]
    r0, r1 = (int(f * h) for f in PATCH_ROWS)
    c0, c1 = (int(f * w) for f in PATCH_COLS)
    return (images[:, :, r0:r1, c0:c1].mean((2, 3)) + 1) * 127.5


def colour_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((centre_colour(a) - centre_colour(b)).abs().mean())


def probe_run(run_dir: str, vl, n: int, seed: int) -> dict:
    from training.evaluation import metrics
    from training.evaluation.eval import encode, translate
    from training.evaluation.inputs import default_cache_dir, emoji_ground_truth, read_run
    from training.labeling.pseudo_labels import image_features
    from training.data import ImageSet

    run = read_run(run_dir, "cpu", progress=False)
    if not run.default_data:
        raise SystemExit(f"{run_dir}: not a run on the embedded default data (the probe assumes centred faces)")
    # as training.eval does: lanit-lite centres features on the image set's mean before the cosine
    image_features(vl, run.paths, default_cache_dir(run), batch_size=64, progress=False)
    model, domains = run.model, run.model.config.domains
    images = ImageSet(run.paths, model.config.img_size, progress=False)
    truth = emoji_ground_truth(run.paths, domains).labels
    rows = {"content": [], "colour": [], "chance_colour": [], "recon_content": [], "recon_colour": []}
    sources_all, features_all = [], []
    for k in range(len(domains)):  # the sources and latents training.eval draws for domain k
        candidates = torch.nonzero(truth[:, k] <= 0).flatten()
        gen = torch.Generator().manual_seed(seed * 1009 + k)
        src = candidates[torch.randperm(len(candidates), generator=gen)[:n]]
        weights = torch.zeros(len(src), len(domains))
        weights[:, k] = 1.0
        z = torch.randn(len(src), model.config.latent_dim, generator=gen)
        x = images.batch(src)
        fake = translate(model, x, weights, z, 64)
        own = truth[src].float()
        keep = own.sum(1) > 0  # sources in no domain have no own style
        recon = translate(model, x[keep], own[keep] / own[keep].sum(1, keepdim=True), z[keep], 64)
        f_src, f_fake, f_recon = (encode(vl, t, 64, "features", False) for t in (x, fake, recon))
        rows["content"].append(metrics.content_preservation(f_src, f_fake))
        rows["colour"].append(colour_error(fake, x))
        rows["chance_colour"].append(colour_error(x[torch.randperm(len(x), generator=gen)], x))
        rows["recon_content"].append(metrics.content_preservation(f_src[keep], f_recon))
        rows["recon_colour"].append(colour_error(recon, x[keep]))
        sources_all.append(x)
        features_all.append(f_src)
    out = {key: sum(v) / len(v) for key, v in rows.items()}
    out["per_domain_colour"] = dict(zip(domains, rows["colour"]))
    out["step"] = model.metadata.get("step")
    eval_file = Path(run_dir) / "eval.json"
    if eval_file.exists():
        summary = json.loads(eval_file.read_text())["summary"]
        out["eval"] = {k: summary[k] for k in ("domain_accuracy", "content", "mFD")}
    return out, torch.cat(sources_all), torch.cat(features_all), images


def degraded_references(vl, sources: torch.Tensor, source_features: torch.Tensor, seed: int) -> dict:
    """The content cosine (and centre-colour error) of the sources (and their features, from
    `probe_run`) against degraded copies."""
    from training.evaluation import metrics
    from training.evaluation.eval import encode

    gen = torch.Generator().manual_seed(seed)
    h = sources.shape[-1]
    variants = {
        "source blurred 2x (down and up, bilinear)": F.interpolate(
            F.interpolate(sources, size=h // 2, mode="bilinear", antialias=True), size=h, mode="bilinear"),
        "source + noise (sigma 0.05)": (sources + 0.05 * torch.randn(sources.shape, generator=gen)).clamp(-1, 1),
        "another random source": sources[torch.randperm(len(sources), generator=gen)],
    }
    return {name: {"content": metrics.content_preservation(source_features, encode(vl, v, 64, "features", False)),
                   "colour": colour_error(v, sources)} for name, v in variants.items()}


def variant_pairs(paths) -> torch.Tensor:
    """[P, 2] index pairs (source, target) of Twemoji files that differ only in the hair component."""
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        groups.setdefault(re.sub(r"-200d-1f9b[0-3]", "", Path(path).stem), []).append(i)
    return torch.tensor([(a, b) for members in groups.values() for a in members for b in members if a != b])


def hair_variants(vl, images) -> dict:
    """The ideal translation's figures: Twemoji draws each person in several hair variants (file
    names `<person>[-<skin tone>]-200d-1f9b0..3`: red, curly, bald, white hair, and the plain one),
    identical but for the hair. Every ordered pair of variants of one person, as source and target.
    `images`: the embedded set's ImageSet, from `probe_run` (which also set lanit-lite's centre)."""
    from training.evaluation import metrics
    from training.evaluation.eval import encode

    pairs = variant_pairs(images.paths)
    x = images.batch(torch.arange(len(images.paths)))
    f = encode(vl, x, 64, "features", False)
    return {"content": metrics.content_preservation(f[pairs[:, 0]], f[pairs[:, 1]]),
            "colour": colour_error(x[pairs[:, 1]], x[pairs[:, 0]]), "pairs": len(pairs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders trained on the embedded default data")
    p.add_argument("--n", type=int, default=50, help="sources per target domain (training.eval's --n)")
    p.add_argument("--seed", type=int, default=0, help="training.eval's seed")
    p.add_argument("--json", default="benchmarks/results/translation_probe.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from training.labeling.vl import load_vision_language

    vl = load_vision_language("lanit-lite", device="cpu")
    vl.eval()
    results = {}
    with torch.no_grad():
        for run_dir in args.runs:  # every run is on the embedded set: the last one's sources serve
            results[run_dir], sources, source_features, images = probe_run(run_dir, vl, args.n, args.seed)
        references = degraded_references(vl, sources, source_features, args.seed)
        references["the same person with other hair (Twemoji's variants: the ideal translation)"] = \
            hair_variants(vl, images)
    print("\n| run | step | domain acc (eval) | content (eval) | mFD (eval) | content here | "
          "own-domain reconstruction content | face-centre colour error | reconstruction colour error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run_dir, r in results.items():
        e = r.get("eval", {})
        cells = [f"{e[k]:.3f}" if k in e else "-" for k in ("domain_accuracy", "content")]
        cells.append(f"{e['mFD']:.4f}" if "mFD" in e else "-")
        print(f"| {run_dir} | {r['step']} | {' | '.join(cells)} | {r['content']:.3f} | {r['recon_content']:.3f} | "
              f"{r['colour']:.1f} | {r['recon_colour']:.1f} |")
    print("\nThe same measures for the sources themselves (the translations' sources, all domains):\n")
    print("| source vs | content | face-centre colour error |")
    print("|---|---|---|")
    for name, r in references.items():
        print(f"| {name} | {r['content']:.3f} | {r['colour']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        machine = describe("translation_probe.py", argv, torch.get_num_threads(), "open_clip")
        Path(args.json).write_text(json.dumps({"n": args.n, "seed": args.seed, "machine": machine,
                                               "runs": results, "references": references}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
