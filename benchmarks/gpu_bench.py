"""The steps of benchmarks/gpu.sh: version check, Triton warm-up, timed rows, summary.

Each step appends one JSON object per line to a .jsonl file in `--out-dir` and flushes it at once,
so a step killed by its timeout keeps every row it finished. The summary step reads them back.

    python3 benchmarks/gpu_bench.py check   --out-dir OUT
    python3 benchmarks/gpu_bench.py warm    --out-dir OUT            # compiles every Triton variant
    python3 benchmarks/gpu_bench.py bench   --out-dir OUT --impls eager_cl triton_cl graphs
    python3 benchmarks/gpu_bench.py bench   --out-dir OUT --impls compile --step compile
    python3 benchmarks/gpu_bench.py summary --out-dir OUT

The matrix (gpu.sh's): 256 px, fp16 and bf16, batch 1 and 32; the generator (StarGAN v2 widths)
and the two heaviest fused ops (adain_conv2d 3x3 at full resolution, and with the nearest x2
upsample: the generator's last block); implementations
  eager_cl   plain PyTorch on channels_last tensors (the generator's nn modules, impl="ref")
  compile    torch.compile(dynamic=False) of the same, one fresh compile per shape (dynamo's
             recompile limit would otherwise turn later shapes silently back into eager)
  triton_cl  lanit_kernels with impl="triton" on channels_last tensors
  graphs     the generator through lanit_rt's TorchBackend with CUDA graphs (impl="auto")
Every non-eager row also records max |out - eager| next to max |eager|.

`--rehearse` runs the same plumbing on the CPU: the Triton interpreter instead of CUDA, a 32 px
toy generator, batch 1, fp16; compile and graphs rows are recorded as skipped. CI runs it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fused_ops import compile_fresh  # noqa: E402

REQUIRED_MODULES = ("torch", "triton", "numpy")
TRAINING_MODULES = ("PIL", "tqdm", "safetensors")  # gpu.sh's train step only
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
OPS = ("generator", "adain_conv3x3", "adain_conv3x3_up")
IMPLS = ("eager_cl", "compile", "triton_cl", "graphs")
SLOPE, EPS = 0.2, 1e-5


class Rows:
    """Appends JSON lines to one file, flushed row by row."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("check", "warm", "bench", "summary"))
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--rehearse", action="store_true",
                   help="CPU rehearsal: Triton interpreter, 32 px toy generator, batch 1")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=["eager_cl", "triton_cl", "graphs"])
    p.add_argument("--step", default="bench", help="name of the .jsonl file the rows go to")
    args = p.parse_args(argv)
    if min(args.batches) < 1:
        p.error("--batches must be at least 1")
    if args.rehearse:
        args.size, args.batches, args.dtypes = 32, [1], ["fp16"]
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    return args


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def check(args) -> int:
    """Print module versions; exit 3 with one line naming what is missing."""
    versions, missing = {}, []
    for name in REQUIRED_MODULES:
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as err:  # ImportError, or a broken install raising something else
            missing.append(f"{name} ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]})")
    try:
        import lanit_kernels.dispatch  # noqa: F401
        import lanit_rt  # noqa: F401
    except Exception as err:
        missing.append(f"lanit_rt/lanit_kernels ({type(err).__name__}: {err})")
    row = {"python": platform.python_version(), **versions, "missing": missing}
    # Triton compiles a small C launcher per kernel: without a compiler every Triton and compile
    # row fails (each says so), while the eager rows still run, so this is reported, not fatal.
    row["c_compiler"] = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or \
        shutil.which("clang") or "none found: Triton and torch.compile rows will fail"
    # gpu.sh reads this list to skip its train step (imported, not just found: a broken install counts)
    row["training_modules_missing"] = [name for name in TRAINING_MODULES if not _imports(name)]
    if not missing:
        import torch

        row["cuda_available"] = torch.cuda.is_available()
        row["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            row["device"] = torch.cuda.get_device_name(0)
            row["capability"] = list(torch.cuda.get_device_capability(0))
        elif not args.rehearse:
            missing.append("a CUDA device (torch.cuda.is_available() is False)")
    Rows(args.out_dir / "check.jsonl").write(row)
    if missing:
        print(f"gpu.sh: cannot run: missing {', '.join(missing)}", file=sys.stderr)
        return 3
    print("gpu.sh: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "missing"))
    return 0


def _setup(args):
    import torch

    device = torch.device("cpu" if args.rehearse else "cuda")
    if args.rehearse:
        torch.set_num_threads(1)
    return torch, device


def _config(args):
    from lanit_rt.config import LanitConfig

    if args.rehearse:
        return LanitConfig(domains=("a", "b", "c"), img_size=args.size, base_dim=8, max_dim=32,
                           style_dim=16)
    return LanitConfig(domains=("a", "b", "c"), img_size=args.size)


def _timer(torch, device, rehearse: bool) -> Callable[[Callable[[], object]], float]:
    if rehearse:  # plumbing only: the interpreter's times mean nothing, one run is enough
        def time_once(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return time_once
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def time_cpu(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return time_cpu


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _case(torch, device, args, op: str, batch: int, dtype):
    """(eager fn, {impl: fn builder}, flops, shape text) for one op at one batch and dtype."""
    import lanit_kernels
    from lanit_kernels import reference
    from lanit_rt.backends.torch import TorchBackend
    from lanit_rt.checkpoint import LanitModel
    from lanit_rt.networks import Generator

    cl = torch.channels_last
    size = args.size
    if op == "generator":
        config = _config(args)
        gen = Generator(config).eval().requires_grad_(False)
        style_table = torch.randn(config.num_domains, config.style_dim)
        model = LanitModel(config, copy.deepcopy(gen), latent_table=style_table)
        gen = gen.to(device=device, dtype=dtype, memory_format=cl)
        x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).to(dtype).contiguous(memory_format=cl)
        weights = torch.zeros(batch, config.num_domains, device=device)
        weights[:, 0] = 1.0
        params = weights @ (gen.adain_params(style_table.to(device=device, dtype=dtype)).float())
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            gen(x[:1], adain_params=params[:1].to(dtype))
        flops = counter.get_total_flops() * batch

        def graphs():
            backend = TorchBackend(model, device=device, dtype=dtype, cuda_graphs=True)
            return lambda: backend.run_params(x, params)

        builders = {
            "compile": lambda: (lambda c: lambda: c(x, adain_params=params.to(dtype), impl="ref"))(
                compile_fresh(torch, gen)),
            "triton_cl": lambda: lambda: gen(x, adain_params=params.to(dtype), impl="triton"),
            "graphs": graphs,
        }
        eager = lambda: gen(x, adain_params=params.to(dtype), impl="ref")  # noqa: E731
        return eager, builders, flops, f"G{size} x[{batch},3,{size},{size}] base {config.stem_dim}"

    base = 8 if args.rehearse else 2**14 // size
    up = op.endswith("_up")
    c_in, h = (2 * base, size // 2) if up else (base, size)
    x = torch.randn(batch, c_in, h, h, device=device).to(dtype).contiguous(memory_format=cl)
    weight = (torch.randn(base, c_in, 3, 3, device=device) * 0.05).to(dtype)
    bias = (torch.randn(base, device=device) * 0.1).to(dtype)
    gamma = (torch.randn(batch, c_in, device=device) * 0.1).to(dtype)
    beta = (torch.randn(batch, c_in, device=device) * 0.1).to(dtype)
    import torch.nn.functional as F

    def eager():
        hidden = F.instance_norm(x, eps=EPS)
        hidden = F.leaky_relu(hidden * (1 + gamma[:, :, None, None]) + beta[:, :, None, None], SLOPE)
        if up:
            hidden = F.interpolate(hidden, scale_factor=2, mode="nearest")
        return F.conv2d(hidden, weight, bias, padding=1)

    builders = {
        "compile": lambda: (lambda c: lambda: c(x, gamma, beta, weight, bias, up))(
            compile_fresh(torch, reference.adain_conv2d_ref)),
        "triton_cl": lambda: lambda: lanit_kernels.adain_conv2d(x, gamma, beta, weight, bias,
                                                                upsample=up, impl="triton"),
    }
    flops = 2 * batch * base * size * size * c_in * 9
    return eager, builders, flops, f"x[{batch},{c_in},{h},{h}]->{base}{' up' if up else ''}"


def _error(torch, out, ref) -> tuple[float, float]:
    out = out.float().to(ref.device)
    return (out - ref.float()).abs().max().item(), ref.float().abs().max().item()


def _note(err: BaseException) -> str:
    """A failed row's note: the error in one line, its type alone when the message is blank."""
    from lanit_rt.errors import describe  # not at the top: `check` runs before lanit_rt is known to import

    return describe(err)[:160]


def bench(args) -> int:
    torch, device = _setup(args)
    timer = _timer(torch, device, args.rehearse)
    rows = Rows(args.out_dir / f"{args.step}.jsonl")
    # Op outermost: when a step runs out of time (torch.compile of the whole generator is slow),
    # the rows it did finish cover every dtype and batch of the ops listed first.
    for op in args.ops:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            for batch in args.batches:
                impls = [impl for impl in args.impls if impl != "graphs" or op == "generator"]
                skipped = [impl for impl in impls if args.rehearse and impl in ("compile", "graphs")]
                for impl in skipped:
                    rows.write(dict(op=op, size=args.size, batch=batch, dtype=dtype_name, impl=impl,
                                    ms=None, note="skipped in the CPU rehearsal"))
                impls = [impl for impl in impls if impl not in skipped]
                if not impls:
                    continue
                with torch.no_grad():
                    eager, builders, flops, shape = _case(torch, device, args, op, batch, dtype)
                    reference_out = eager()
                for impl in impls:
                    row = dict(op=op, size=args.size, batch=batch, dtype=dtype_name, impl=impl,
                               shape=shape, ms=None, tflop_s=None, max_err=None, max_ref=None,
                               build_s=None, note="")
                    try:
                        with torch.no_grad():
                            graphs_before = _graph_count()
                            start = time.perf_counter()
                            fn = eager if impl == "eager_cl" else builders[impl]()
                            out = fn()  # compiles (Triton, inductor) or captures here
                            _sync(torch, device)
                            row["build_s"] = round(time.perf_counter() - start, 2)
                            if impl == "compile":
                                row["dynamo_graphs"] = _graph_count() - graphs_before
                                if row["dynamo_graphs"] == 0:
                                    row["note"] = "dynamo compiled no graph: this row is eager"
                            if impl != "eager_cl":
                                row["max_err"], row["max_ref"] = _error(torch, out, reference_out)
                            row["ms"] = round(timer(fn), 4)
                            row["tflop_s"] = round(flops / row["ms"] / 1e9, 2)
                    except Exception as err:  # one row fails, the matrix goes on
                        row["note"] = _note(err)
                    rows.write(row)
                    print(_format(row), flush=True)
                del eager, builders
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 0


def warm(args) -> int:
    """Run every Triton launch of the matrix once so the timed steps find their kernels in the
    Triton cache; one row per (dtype, batch). The generator alone covers them: the fused-op rows
    are its last block's two convs (lanit_kernels.aot lists the variants)."""
    torch, device = _setup(args)
    rows = Rows(args.out_dir / "warm.jsonl")
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))

    def cached() -> int:  # one metadata file per compile (Triton writes a __grp__ twin beside it)
        if not cache.exists():
            return 0
        return sum(1 for f in cache.glob("*/*.json") if not f.name.startswith("__grp__"))

    for dtype_name in args.dtypes:
        dtype = getattr(torch, DTYPES[dtype_name])
        for batch in args.batches:
            before, start = cached(), time.perf_counter()
            row = dict(dtype=dtype_name, batch=batch, note="")
            try:
                with torch.no_grad():
                    _, builders, _, _ = _case(torch, device, args, "generator", batch, dtype)
                    builders["triton_cl"]()()
                _sync(torch, device)
            except Exception as err:
                row["note"] = _note(err)
            row.update(seconds=round(time.perf_counter() - start, 2), new_cache_entries=cached() - before)
            rows.write(row)
            print(f"warm {dtype_name} batch {batch}: {row['seconds']} s, "
                  f"{row['new_cache_entries']} new Triton cache entries {row['note']}", flush=True)
    return 0


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (f"{'op':<17} {'batch':>5} {'dtype':<5} {'impl':<9} {'ms':>9} {'TFLOP/s':>8} {'x eager':>7} "
          f"{'max err':>9} {'max ref':>8} {'build s':>7}  note")


def _format(row: dict, eager_ms: float | None = None) -> str:
    speedup = None if not (eager_ms and row.get("ms")) else eager_ms / row["ms"]
    return (f"{row['op']:<17} {row['batch']:>5} {row['dtype']:<5} {row['impl']:<9} "
            f"{_fmt(row.get('ms'), 3):>9} {_fmt(row.get('tflop_s'), 2):>8} {_fmt(speedup, 2):>7} "
            f"{_fmt(row.get('max_err'), 5):>9} {_fmt(row.get('max_ref'), 2):>8} "
            f"{_fmt(row.get('build_s'), 1):>7}  {row.get('note', '')}")


def summary(args) -> int:
    out = args.out_dir
    check_rows, warm_rows = _read(out / "check.jsonl"), _read(out / "warm.jsonl")
    rows = _read(out / "bench.jsonl") + _read(out / "compile.jsonl")
    selfcheck = _read(out / "selfcheck.jsonl")
    lines = []
    if check_rows:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in check_rows[-1].items()
                                             if k != "missing"))
    for row in warm_rows:
        lines.append(f"warm-up {row['dtype']} batch {row['batch']}: {row['seconds']} s, "
                     f"{row['new_cache_entries']} Triton compiles {row.get('note', '')}".rstrip())
    if selfcheck:
        worst = max(selfcheck, key=lambda r: r["max_err"] / max(1.0, r["max_ref"]))
        lines.append(f"selfcheck: {len(selfcheck)} checks, worst {worst['check']} "
                     f"max err {worst['max_err']:.3g} (max ref {worst['max_ref']:.3g})")
    eager = {(r["op"], r["batch"], r["dtype"]): r.get("ms") for r in rows if r["impl"] == "eager_cl"}
    order = {impl: i for i, impl in enumerate(IMPLS)}
    rows.sort(key=lambda r: (r["dtype"], r["op"], r["batch"], order.get(r["impl"], 9)))
    lines += ["", HEADER, "-" * len(HEADER)]
    lines += [_format(r, eager.get((r["op"], r["batch"], r["dtype"]))) for r in rows]
    train = _train_lines(out / "train_step.json")
    if train:
        lines += ["", *train]
    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(
        {"check": check_rows, "warm": warm_rows, "selfcheck": selfcheck, "rows": rows}, indent=1),
        encoding="utf-8")
    return 0


def _train_lines(path: Path) -> list[str]:
    """benchmarks/train_step.py's rows (gpu.sh's train step), one line each, with the phases."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    lines = []
    for row in rows:
        phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(row.get("phases_s", {}).items()))
        lines.append(f"train {row['size']} ({row['img_size']} px, batch {row['batch_size']}): "
                     f"{row['steps_per_s']:.2f} steps/s, {row['images_per_s']:.1f} images/s; "
                     f"ms/step: {phases}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return {"check": check, "warm": warm, "bench": bench, "summary": summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
