"""Quality benchmark: stage 1 only vs stage 1 + prompt learning, same data, budget and seed.

Trains the default configuration twice through the public CLIs (`python -m training.run --stage 1`
and `--stage 2`; stage 2 learns the prompt context from step steps/2, so a wall-clock cap that
stops a run before then leaves its prompts unlearned: the table shows the steps done), evaluates
both runs with `python -m training.eval`, prints the two tables side by side and writes them as JSON.

    python benchmarks/quality.py --steps 2000 --out runs/quality
    python benchmarks/quality.py --out runs/quality --skip-train     # re-evaluate existing runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, path into eval.json, scale, digits)
ROWS = [
    ("training steps done", ("step",), 1, 0),
    ("pseudo-label macro F1, stage-1 prompts (adaptive)", ("summary", "macro_f1_stage1"), 1, 3),
    ("pseudo-label macro F1, learned prompts (adaptive)", ("summary", "macro_f1_learned"), 1, 3),
    ("pseudo-label macro F1, stage-1 prompts (top-k)", ("pseudo_labels", "stage1", "topk", "macro_f1"), 1, 3),
    ("pseudo-label macro F1, stage-1 prompts (threshold)",
     ("pseudo_labels", "stage1", "threshold", "macro_f1"), 1, 3),
    ("pseudo-label macro F1, trainer's final labels", ("pseudo_labels", "trainer", "macro_f1"), 1, 3),
    ("mFD (lower is better)", ("summary", "mFD"), 1, 4),
    ("mKID x1e3 (lower is better)", ("summary", "mKID"), 1e3, 3),
    ("density", ("summary", "density"), 1, 3),
    ("coverage", ("summary", "coverage"), 1, 3),
    ("domain accuracy", ("summary", "domain_accuracy"), 1, 3),
    ("top-1 domain accuracy", ("translation", "mean", "top1_accuracy"), 1, 3),
    ("content preservation (cosine)", ("summary", "content"), 1, 3),
    ("identity mFD (untranslated sources)", ("translation", "identity_mean", "fd"), 1, 4),
    ("identity domain accuracy", ("translation", "identity_mean", "domain_accuracy"), 1, 3),
    ("real images of the targets: domain accuracy", ("translation", "real_mean", "domain_accuracy"), 1, 3),
    ("real images of the targets: top-1 accuracy", ("translation", "real_mean", "top1_accuracy"), 1, 3),
]


def lookup(data: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def run(cmd: list[str]) -> float:
    """Run one CLI in the caller's folder (so that relative --out / --gt / --labeler paths mean
    what they meant to the caller), with this checkout importable."""
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise SystemExit(f"quality: {cmd[2]} exited with {done.returncode}; see its message above")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per setting")
    p.add_argument("--max-minutes", type=float,
                   help="wall-clock cap per training run, from its start to the end of its closing "
                        "evaluation (the trainer's max_minutes; without it the embedded default data "
                        "gets its default budget, training.config.DEFAULT_DATA_MAX_MINUTES)")
    p.add_argument("--out", default="runs/quality", help="folder for the two runs and the JSON")
    p.add_argument("--n", type=int, default=100, help="translations per target domain in the eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gt", help="ground truth for the eval (not needed for the embedded default data)")
    p.add_argument("--labeler", help="labeler for training and evaluation (default: the trainer's)")
    p.add_argument("--device", default=None, help="training device (default: the trainer's auto)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training config override for both runs (repeatable)")
    p.add_argument("--skip-train", action="store_true", help="evaluate runs already in --out")
    p.add_argument("--json", help="result file (default OUT/quality.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.n < 2:
        p.error("--steps must be at least 1 and --n at least 2 (training.eval's minimum)")
    if args.gt is not None and not Path(args.gt).exists():
        p.error(f"--gt {args.gt} does not exist")
    if args.json is not None:
        sys.path.insert(0, str(ROOT))
        from lanit_rt.checkpoint import OutputPathError, check_output_file

        try:  # the result is written after two trainings: an unusable path must fail now
            check_output_file(args.json)
        except OutputPathError as err:
            p.error(f"--json: {err}")

    out = Path(args.out)
    if args.skip_train:
        missing = [str(out / f"stage{stage}") for stage in (1, 2)
                   if not (out / f"stage{stage}" / "model.safetensors").exists()]
        if missing:  # training them would take the whole run's time, unasked
            p.error(f"--skip-train: no trained run in {', '.join(missing)}")
    else:
        held = [out / f"stage{stage}" for stage in (1, 2) if (out / f"stage{stage}" / "model.safetensors").exists()
                or (out / f"stage{stage}" / "train_state.pt").exists()]
        if held:  # the trainer refuses a new run there; say so before the first run starts
            p.error(f"runs already in {', '.join(map(str, held))}: pass --skip-train to evaluate them, "
                    "or choose another --out")
    results, timings = {}, {}
    for stage in (1, 2):
        run_dir = out / f"stage{stage}"
        name = "stage 1" if stage == 1 else "stage 1 + prompts"
        if not args.skip_train:
            # Both arms switch to the compiled blocks at one step: by default the second run would
            # find the first one's compile in the caches and switch after step 1 (compile_after).
            cmd = [sys.executable, "-m", "training.run", "--steps", str(args.steps), "--stage", str(stage),
                   "--out", str(run_dir), "--seed", str(args.seed), "--no-progress",
                   "--set", "compile_after=300"]
            if args.labeler:
                cmd += ["--labeler", args.labeler]
            if args.max_minutes is not None:
                cmd += ["--set", f"max_minutes={args.max_minutes}"]
            if args.device:
                cmd += ["--set", f"device={args.device}"]
            for override in args.set:
                cmd += ["--set", override]
            timings[name] = {"train_s": run(cmd)}
        cmd = [sys.executable, "-m", "training.eval", str(run_dir), "--n", str(args.n),
               "--seed", str(args.seed), "--no-progress"]
        if args.labeler:
            cmd += ["--labeler", args.labeler]
        if args.gt:
            cmd += ["--gt", args.gt]
        timings.setdefault(name, {})["eval_s"] = run(cmd)
        results[name] = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))

    names = list(results)
    width = max(len(r[0]) for r in ROWS)
    header = f"| {'metric':<{width}} | " + " | ".join(f"{n:>17}" for n in names) + " |"
    print()
    print(header)
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * 19 for _ in names) + "|")
    table = {}
    for label, path, scale, digits in ROWS:
        values = [lookup(results[n], path) for n in names]
        table[label] = dict(zip(names, values))
        cells = ["-" if v is None else f"{v * scale:.{digits}f}" for v in values]
        print(f"| {label:<{width}} | " + " | ".join(f"{c:>17}" for c in cells) + " |")
    first = results[names[0]]
    print(f"\nsteps requested {args.steps}, seed {args.seed}, labeler {first['labeler']}, "
          f"{first['num_images']} images, domains {first['domains']}")

    record = {
        "benchmark": "quality", "steps": args.steps, "max_minutes": args.max_minutes,
        "seed": args.seed, "n": args.n, "trained": {n: trained_as(out / f"stage{s}") for n, s in zip(names, (1, 2))},
        "labeler": first["labeler"], "domains": first["domains"], "table": table,
        "timings_s": timings, "runs": {n: str(out / f"stage{s}") for n, s in zip(names, (1, 2))},
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "processor": platform.processor()},
    }
    json_path = Path(args.json) if args.json else out / "quality.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {json_path}")
    return 0


def trained_as(run_dir: Path) -> dict:
    """What a run folder holds, from its own files: the step its checkpoint was saved at and the
    settings it trained with (with --skip-train these, not this command's flags, describe it)."""
    from lanit_rt import read_checkpoint_config

    _, metadata = read_checkpoint_config(run_dir)
    settings = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    keys = ("steps", "max_minutes", "seed", "stage", "prompt_start", "img_size", "labeler", "lr")
    return {"step": metadata.get("step"), **{k: settings.get(k) for k in keys}}


if __name__ == "__main__":
    sys.exit(main())
