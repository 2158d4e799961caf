"""Kernel benchmark: fused Triton ops and the whole generator vs eager PyTorch and torch.compile.

For each op (adain; adain_conv2d 3x3 at full resolution and with the nearest x2 upsample;
modconv2d at the 16x16 bottleneck) and the generator, at 128 and 256 px, batch 1/8/32/64 and
fp16/bf16/fp32, times these implementations and reports ms, effective GB/s (compulsory bytes: read
inputs and weights once, write the output once) and TFLOP/s (2 * MACs of the convolutions as
written; the Triton upsampling conv does 4/9 of those MACs, so its figure is "effective"):

  eager      plain PyTorch ops as a model would run them (F.instance_norm, mul/add, leaky_relu,
             F.interpolate, cuDNN conv; for the generator its nn modules with impl="ref")
  eager_cl   the same on channels_last tensors
  compile    torch.compile of the lanit_kernels.reference function (of the generator with impl="ref"),
             compiled afresh per row (compile_fresh: dynamo's recompile limit would turn later
             shapes back into eager)
  triton     lanit_kernels.* with impl="triton" (NCHW)
  triton_cl  the same on channels_last tensors

GPU timing uses triton.testing.do_bench (median), CPU timing the median of perf_counter runs.
Triton needs a CUDA GPU: on CPU the triton rows are skipped unless --interpret (the interpreter is a
correctness tool and its timings mean nothing). `--quick` is a tiny CPU smoke run.

    python benchmarks/fused_ops.py --out benchmarks/results/fused_ops.json            # full, on a GPU
    python benchmarks/fused_ops.py --quick --out /tmp/fused_ops_quick.json            # CPU smoke
    python benchmarks/fused_ops.py --sizes 256 --batches 64 --dtypes fp16 --ops generator
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
OPS = ("adain", "adain_conv3x3", "adain_conv3x3_up", "modconv3x3", "generator")
IMPLS = ("eager", "eager_cl", "compile", "triton", "triton_cl")
SLOPE, EPS = 0.2, 1e-5


@dataclass
class Row:
    op: str
    img_size: int
    batch: int
    dtype: str
    impl: str
    shape: str
    ms: float | None
    gb_s: float | None
    tflop_s: float | None
    speedup_vs_eager: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny CPU smoke run: toy generator; and unless given, --sizes 32 --batches 1 "
                        "--dtypes fp32")
    p.add_argument("--sizes", type=int, nargs="+", help="default: 128 256")
    p.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 64")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp16 bf16 fp32")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--interpret", action="store_true",
                   help="on CPU, also time the Triton interpreter (correctness only, very slow)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (1 keeps shared, loaded machines from stalling)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fused_ops.json")
    args = p.parse_args(argv)
    # --quick picks small defaults; what is given on the command line still counts
    args.sizes = args.sizes or ([32] if args.quick else [128, 256])
    args.batches = args.batches or ([1] if args.quick else [1, 8, 32, 64])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp16", "bf16", "fp32"])
    if args.threads < 1 or min(args.batches) < 1 or min(args.sizes) < 1:
        p.error("--threads, --sizes and --batches must be at least 1")
    return args


def make_timer(device):
    import torch

    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None

        def time_cuda(fn: Callable[[], object]) -> float:
            if do_bench is not None:
                return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(20):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return time_cuda

    def time_cpu(fn: Callable[[], object]) -> float:
        fn()
        times = []
        deadline = time.perf_counter() + 2.0
        while len(times) < 3 or (len(times) < 20 and time.perf_counter() < deadline):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return time_cpu


def channels_last(t):
    import torch

    return t.contiguous(memory_format=torch.channels_last)


def op_cases(op: str, size: int, base: int, max_dim: int, batch: int, dtype, device):
    """(shape text, inputs dict, compulsory bytes, flops) for one op at one generator size."""
    import torch

    es = torch.empty((), dtype=dtype).element_size()

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    if op == "adain":  # the to_rgb IN: widest activation of the generator
        x = rand(batch, base, size, size)
        gamma, beta = rand(batch, base, scale=0.1), rand(batch, base, scale=0.1)
        return (f"x[{batch},{base},{size},{size}]", dict(x=x, gamma=gamma, beta=beta),
                2 * x.numel() * es, None)
    if op in ("adain_conv3x3", "adain_conv3x3_up"):
        up = op.endswith("_up")
        c_in, h = (2 * base, size // 2) if up else (base, size)
        x = rand(batch, c_in, h, h)
        weight, bias = rand(base, c_in, 3, 3, scale=0.05), rand(base, scale=0.1)
        gamma, beta = rand(batch, c_in, scale=0.1), rand(batch, c_in, scale=0.1)
        out_numel = batch * base * size * size
        flops = 2 * out_numel * c_in * 9
        return (f"x[{batch},{c_in},{h},{h}]->{base}{' up' if up else ''}",
                dict(x=x, gamma=gamma, beta=beta, weight=weight, bias=bias, upsample=up),
                (x.numel() + out_numel + weight.numel()) * es, flops)
    if op == "modconv3x3":  # the 16x16 bottleneck at max_dim channels
        c = max_dim
        x = rand(batch, c, 16, 16)
        weight, style = rand(c, c, 3, 3, scale=0.02), rand(batch, c)
        return (f"x[{batch},{c},16,16]", dict(x=x, weight=weight, style=style),
                (2 * x.numel() + weight.numel()) * es, 2 * x.numel() * c * 9)
    raise ValueError(op)


def eager_fn(op: str, inputs: dict) -> Callable[[], object]:
    import torch.nn.functional as F

    def adain_eager(x, gamma, beta):
        h = F.instance_norm(x, eps=EPS)
        return F.leaky_relu(h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None], SLOPE)

    if op == "adain":
        return lambda: adain_eager(**inputs)
    if op.startswith("adain_conv"):
        def block():
            h = adain_eager(inputs["x"], inputs["gamma"], inputs["beta"])
            if inputs["upsample"]:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            return F.conv2d(h, inputs["weight"], inputs["bias"], padding=1)
        return block
    if op == "modconv3x3":
        x, weight, style = inputs["x"], inputs["weight"], inputs["style"]

        def modconv():
            dcoef = (style.square() @ weight.square().sum(dim=(2, 3)).t() + 1e-8).rsqrt()
            return F.conv2d(x * style[:, :, None, None], weight, padding=1) * dcoef[:, :, None, None]
        return modconv
    raise ValueError(op)


def compile_fresh(torch, fn, backend: str = "inductor"):
    """torch.compile(fn, dynamic=False) for one shape, with dynamo's per-function recompile limit
    out of the way: the limit is raised (its name differs across torch versions) and the caches are
    reset, so every shape gets its own compiled graph instead of a silent eager fallback (a sweep
    of 16 shape/dtype combinations passes the default limit of 8)."""
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=backend)


def op_fn(op: str, impl: str, inputs: dict) -> Callable[[], object]:
    import torch

    import lanit_kernels
    from lanit_kernels import reference

    if impl.endswith("_cl"):
        inputs = dict(inputs, x=channels_last(inputs["x"]))
    if impl.startswith("eager"):
        return eager_fn(op, inputs)
    if impl == "compile":
        ref = {"adain": reference.adain_ref, "modconv3x3": reference.modconv2d_ref}.get(
            op, reference.adain_conv2d_ref)
        compiled = compile_fresh(torch, ref)
        return lambda: compiled(**inputs)
    fn = {"adain": lanit_kernels.adain, "modconv3x3": lanit_kernels.modconv2d}.get(op, lanit_kernels.adain_conv2d)
    return lambda: fn(**inputs, impl="triton")


def generator_case(size: int, batch: int, dtype, device, quick: bool):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lanit_rt.config import LanitConfig
    from lanit_rt.networks import Generator

    config = (LanitConfig(domains=("a", "b", "c"), img_size=size, base_dim=8, max_dim=32,
                          style_dim=16) if quick else LanitConfig(domains=("a", "b", "c"), img_size=size))
    gen = Generator(config).eval().to(device=device, dtype=dtype)
    x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).to(dtype)
    with torch.no_grad():
        params = gen.adain_params(torch.randn(batch, config.style_dim, device=device).to(dtype))
        with FlopCounterMode(display=False) as counter:
            gen(x[:1], adain_params=params[:1])
    flops = counter.get_total_flops() * batch
    return gen, x, params, flops, f"G{size} x[{batch},3,{size},{size}] base {config.stem_dim}"


def generator_fn(gen, x, params, impl: str) -> Callable[[], object]:
    import torch

    if impl.endswith("_cl"):
        x = channels_last(x)
        gen = copy.deepcopy(gen).to(memory_format=torch.channels_last)
    if impl.startswith("eager"):
        return lambda: gen(x, adain_params=params, impl="ref")
    if impl == "compile":
        compiled = compile_fresh(torch, gen)
        return lambda: compiled(x, adain_params=params, impl="ref")
    return lambda: gen(x, adain_params=params, impl="triton")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from lanit_rt.config import ConfigError, LanitConfig

    for size in args.sizes:  # before any row is timed (imported only now: TRITON_INTERPRET is set)
        try:
            LanitConfig(domains=("a", "b"), img_size=size)
        except ConfigError as err:
            print(f"fused_ops.py: error: --sizes {size}: {err}", file=sys.stderr)
            return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = (f"CPU: {platform.processor() or platform.machine()} ({args.threads} of "
                       f"{os.cpu_count()} threads)")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    timer = make_timer(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    triton_ok = triton_version is not None and (device.type == "cuda" or args.interpret)

    rows: list[Row] = []
    print(HEADER, flush=True)
    for size in args.sizes:
        base, max_dim = (8, 32) if args.quick else (2**14 // size, 512)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, DTYPES[dtype_name])
            for batch in args.batches:
                for op in args.ops:
                    if op == "generator":
                        gen, x, params, flops, shape = generator_case(size, batch, dtype, device,
                                                                      args.quick)
                        nbytes = None
                    else:
                        shape, inputs, nbytes, flops = op_cases(op, size, base, max_dim, batch,
                                                                dtype, device)
                    eager_ms = None
                    for impl in args.impls:
                        row = Row(op, size, batch, dtype_name, impl, shape, None, None, None)
                        if impl.startswith("triton") and not triton_ok:
                            row.note = "needs a CUDA GPU (or --interpret) and triton"
                            rows.append(row)
                            continue
                        try:
                            with torch.no_grad():
                                fn = (generator_fn(gen, x, params, impl) if op == "generator"
                                      else op_fn(op, impl, inputs))
                                row.ms = timer(fn)
                        except Exception as err:  # a benchmark row fails, the sweep goes on
                            row.note = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                            rows.append(row)
                            print_row(row)
                            continue
                        if impl == "eager":
                            eager_ms = row.ms
                        row.gb_s = None if nbytes is None else nbytes / row.ms / 1e6
                        row.tflop_s = None if not flops else flops / row.ms / 1e9
                        row.speedup_vs_eager = None if eager_ms is None else eager_ms / row.ms
                        rows.append(row)
                        print_row(row)
                    if op == "generator":
                        del gen, x, params
                    else:
                        del inputs
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    print()
    print_table(rows)
    result = {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "quick": args.quick,
        "interpreted_triton": bool(args.interpret),  # TRITON_INTERPRET=1 was set, on any device
        "threads": args.threads if device.type == "cpu" else None,
        "command": shlex.join(["python", "benchmarks/fused_ops.py", *(sys.argv[1:] if argv is None else argv)]),
        "bytes_model": "compulsory bytes: inputs + weights read once, output written once",
        "rows": [asdict(r) for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{device_name}; wrote {args.out}")
    return 0


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (f"{'op':<17} {'px':>4} {'batch':>5} {'dtype':<5} {'impl':<10} {'ms':>9} {'GB/s':>8} "
          f"{'TFLOP/s':>8} {'x eager':>7}  note")


def print_row(row: Row) -> None:
    print(f"{row.op:<17} {row.img_size:>4} {row.batch:>5} {row.dtype:<5} {row.impl:<10} "
          f"{_fmt(row.ms, 3):>9} {_fmt(row.gb_s, 1):>8} {_fmt(row.tflop_s, 2):>8} "
          f"{_fmt(row.speedup_vs_eager, 2):>7}  {row.note}", flush=True)


def print_table(rows: list[Row]) -> None:
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        print_row(row)


if __name__ == "__main__":
    sys.exit(main())
