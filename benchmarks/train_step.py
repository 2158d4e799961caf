"""Training steps per second, old code vs this tree, side by side, with a per-phase breakdown.

Each measurement runs in a fresh worker process on one side: "old" is the package as it was at
`--baseline` (extracted with `git archive`, so nothing in this checkout changes), "new" is this tree.
Both train on the same synthetic image folder with fixed random single-domain labels (the cost of a
step does not depend on what the images show, and the GPU machine has no labeler), each side with
its own default config; the `--sizes` rows override only img_size. Sides alternate for `--rounds`
rounds and the median is reported, so both see the same machine load.

The phases (new side; the old code has no clock) come from training.train.PhaseClock: data, d_fakes
(the D steps' generator pass), d_latent / d_ref (D forward, R1, backward), g_latent / g_ref (the
generator objectives and backward), dl (the domain-regularisation loss), optimizer, ema.

    python benchmarks/train_step.py [--sizes default 64 128] [--steps 20] [--warmup 3] [--rounds 2]
        [--baseline REV] [--device cpu|cuda] [--threads N] [--set key=value ...]
        [--json benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("blond hair", "red hair", "white hair", "curly hair", "bald", "beard")
NUM_IMAGES = 144  # the embedded default set's size
# The commit before issue 22's changes: the training step as it was.
DEFAULT_BASELINE = "b992733"
PACKAGES = ("lanit_rt", "lanit_kernels", "training")


# ----------------------------------------------------------------------------- worker

def synthetic_images(folder: Path, size: int = 72) -> Path:
    """NUM_IMAGES noise PNGs (made once per folder)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        file = folder / f"{i:03d}.png"
        if not file.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(file)
    return folder


class FixedLabels:
    """Stands in for training.train.Labeler: one random active domain per image, no labeler."""

    def __init__(self, num_images: int, num_domains: int, device):
        import torch

        gen = torch.Generator().manual_seed(0)
        picks = torch.randint(num_domains, (num_images,), generator=gen)
        self.labels = torch.nn.functional.one_hot(picks, num_domains).float().to(device)
        self.prompt_bank = torch.nn.Module()

    def label(self):
        return self.labels, self.labels.clone()


def worker(args: argparse.Namespace) -> dict:
    import torch

    import training
    from training.config import TrainConfig, parse_override
    from training.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    changes = {"data": str(synthetic_images(Path(args.images))), "domains": DOMAINS,
               "out": tempfile.mkdtemp(prefix="train_step."), "steps": 10 ** 6, "log_every": 0,
               "sample_every": 0, "save_every": 0, "device": args.device}
    if args.size != "default":
        changes["img_size"] = int(args.size)
    for text in args.set:
        key, value = parse_override(text)
        changes[key] = value
    cfg = TrainConfig(**changes)

    class BenchTrainer(Trainer):
        def _build_labeler(self, vl, paths):
            return FixedLabels(len(paths), len(DOMAINS), self.device)

    trainer = BenchTrainer(cfg, progress=False)
    if hasattr(trainer, "compile_now"):  # older code compiled in the constructor
        trainer.compile_now()
    device = trainer.device
    if device.type == "cpu":
        try:  # what Trainer.run does before its loop; older code has no such step
            from training.acceleration import keep_freed_memory
        except ImportError:
            pass
        else:
            keep_freed_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.train_step()
    clock = getattr(trainer, "clock", None)  # the old code has none
    if clock is not None:
        clock = trainer.clock = type(clock)(enabled=args.phases, device=device)
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        sync()
        times.append(time.perf_counter() - start)
    total = sum(times)
    phases = {} if clock is None or not args.phases else {
        name: seconds / args.steps for name, seconds in sorted(clock.totals.items())}
    return {"img_size": cfg.img_size, "batch_size": cfg.batch_size, "steps": args.steps,
            "steps_per_s": args.steps / total, "median_step_s": statistics.median(times),
            "images_per_s": args.steps * cfg.batch_size / total, "phases_s": phases,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "code": str(Path(training.__file__).resolve().parents[1]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "config": {k: v for k, v in cfg.to_dict().items()
                       if k in ("img_size", "base_dim", "max_dim", "mapping_dim", "batch_size",
                                "recipe", "r1_every", "lambda_r1", "lambda_id")},
            "compiled": getattr(trainer, "compiled", False)}


# ----------------------------------------------------------------------------- driver

def extract(rev: str, into: Path) -> Path:
    """The packages as they were at `rev`, unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *PACKAGES], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def commit_of(rev: str) -> str | None:
    """The commit a revision names (HEAD moves, so the JSON records what it was), or None."""
    if not rev:
        return None
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True,
                              text=True)
    except OSError:  # no git on this machine (the GPU machine's copy): the measurements still count
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def run_worker(code: Path, size: str, args: argparse.Namespace, images: Path, phases: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--size", size,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--images", str(images)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if phases:
        command.append("--phases")
    for text in args.set if code == ROOT else ():
        command += ["--set", text]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(code))
    if done.returncode != 0:
        raise SystemExit(f"worker ({code}, size {size}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["default", "64", "128"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the old side ('' : none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config key on the new side")
    p.add_argument("--json", default="benchmarks/results/train_step.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="default", help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")

    with tempfile.TemporaryDirectory(prefix="train_step.") as tmp:
        sides = {"new": ROOT}
        if args.baseline:
            old = Path(tmp, "old").resolve()
            old.mkdir()
            sides = {"old": extract(args.baseline, old), "new": ROOT}
        images = synthetic_images(Path(tmp, "images"))
        rows = []
        for size in args.sizes:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for round_ in range(args.rounds):
                for side, code in sides.items():
                    result = run_worker(code, size, args, images, phases=side == "new")
                    runs[side].append(result)
                    print(f"size {size:>7} {side}: {result['steps_per_s']:.3f} steps/s "
                          f"(round {round_ + 1})", file=sys.stderr, flush=True)
            for side, results in runs.items():
                best = sorted(results, key=lambda r: r["steps_per_s"])[len(results) // 2]
                rows.append({"size": size, "side": side, **best,
                             "steps_per_s_rounds": [r["steps_per_s"] for r in results]})
    by_key = {(r["size"], r["side"]): r for r in rows}
    print("\n| config | side | img | batch | steps/s | s/step (median) | images/s | speed-up | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = by_key.get((r["size"], "old"))
        speedup = f"{r['steps_per_s'] / old['steps_per_s']:.2f}x" if old and r["side"] == "new" else "-"
        print(f"| {r['size']} | {r['side']} | {r['img_size']} | {r['batch_size']} | {r['steps_per_s']:.3f} | "
              f"{r['median_step_s']:.3f} | {r['images_per_s']:.1f} | {speedup} | {r['peak_rss_mb']:.0f} |")
    phase_rows = [r for r in rows if r["phases_s"]]
    if phase_rows:
        names = sorted({n for r in phase_rows for n in r["phases_s"]})
        print("\nPer-phase seconds per step (new side):\n")
        print("| config | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in phase_rows:
            print(f"| {r['size']} | " + " | ".join(f"{r['phases_s'].get(n, 0.0):.3f}" for n in names) + " |")
    record = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "device": args.device},
              "baseline": args.baseline, "baseline_commit": commit_of(args.baseline),
              "new_commit": commit_of("HEAD"), "new_overrides": args.set, "steps": args.steps,
              "warmup": args.warmup, "rounds": args.rounds, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
