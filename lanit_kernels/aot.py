"""Compile, without a GPU, every Triton kernel variant that benchmarks/gpu.sh launches, and audit it.

The interpreter (TRITON_INTERPRET=1) runs kernels with numpy and never checks what only the GPU
compiler does: tl.dot tile shapes and operand dtypes, register and shared-memory budgets. This
traces the launches gpu.sh makes (the generator at `--size` px and the two heaviest fused ops, the
adain_conv2d 3x3 at full resolution and with the nearest x2 upsample, at each `--batches` size,
channels_last as the CUDA backend runs), keeps the distinct compilations (a variant is a kernel,
its dtype, its constexpr arguments and launch options) and compiles each one ahead of time for
`--arch` (90 = H100/H200, 80 = A100). Per variant it reports the compile seconds, PTX lines,
registers, spill bytes (ptxas -v from Triton's own package) and shared memory, then prints a
table and one JSON object (also written to `--out`).

    TRITON_INTERPRET=0 python -m lanit_kernels.aot --arch 90
    TRITON_INTERPRET=0 python -m lanit_kernels.aot --arch 90 --list    # the variant set, no compiles

Compiles go to a fresh Triton cache so the seconds are real compile times. On the GPU Triton also
specialises integer arguments (== 1, divisible by 16), which can split one variant here into a
few near-identical compiles there; the code and its register budget are the same. Must run with
TRITON_INTERPRET unset or 0 (under the interpreter @triton.jit gives functions that cannot be
compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
GPU_SH_OPS = ("generator", "adain_conv3x3", "adain_conv3x3_up")
_FP32_POINTERS = ("scale_ptr", "shift_ptr", "out_scale_ptr", "gamma_ptr", "beta_ptr", "mean_ptr",
                  "m2_ptr")
_FP32_SCALARS = ("eps", "negative_slope")


@contextmanager
def _recording_kernel_calls(calls: list[dict]):
    """Replace the fused ops by recorders that return empty meta tensors of the right shape."""
    import lanit_kernels

    def adain_conv2d(x, gamma, beta, weight, bias=None, upsample=False, eps=1e-5,
                     negative_slope=0.2, impl="auto"):
        n, c_in, h, w = x.shape
        calls.append(dict(op="adain_conv2d", n=n, c_in=c_in, h=h, w=w, c_out=weight.shape[0],
                          k=weight.shape[-1], upsample=bool(upsample), has_bias=bias is not None,
                          has_act=negative_slope is not None))
        scale = 2 if upsample else 1
        return torch.empty(n, weight.shape[0], h * scale, w * scale, device="meta", dtype=x.dtype)

    saved = lanit_kernels.adain_conv2d
    lanit_kernels.adain_conv2d = adain_conv2d
    try:
        yield
    finally:
        lanit_kernels.adain_conv2d = saved


def trace_calls(size: int, batch: int, ops=GPU_SH_OPS) -> list[dict]:
    """The fused-op calls gpu.sh makes at one image size and batch (shapes only, meta tensors)."""
    from lanit_rt.config import LanitConfig
    from lanit_rt.networks import Generator

    calls: list[dict] = []
    base = 2**14 // size  # benchmarks/fused_ops.py: the op shapes of the generator's last block
    with _recording_kernel_calls(calls), torch.no_grad():
        import lanit_kernels

        for op in ops:
            if op == "generator":
                config = LanitConfig(domains=("a", "b", "c"), img_size=size)
                with torch.device("meta"):
                    gen = Generator(config).eval()
                    x = torch.empty(batch, 3, size, size)
                    gen(x, adain_params=torch.empty(batch, gen.adain_dim), impl="triton")
            elif op in ("adain_conv3x3", "adain_conv3x3_up"):
                up = op.endswith("_up")
                c_in, h = (2 * base, size // 2) if up else (base, size)
                x = torch.empty(batch, c_in, h, h, device="meta")
                lanit_kernels.adain_conv2d(x, None, None, torch.empty(base, c_in, 3, 3, device="meta"),
                                           torch.empty(base, device="meta"), upsample=up)
            else:
                raise ValueError(f"unknown op {op!r}; choose from {GPU_SH_OPS}")
    return calls


def variants(size: int = 256, batches=(1, 32), dtypes=(torch.float16, torch.bfloat16),
             ops=GPU_SH_OPS, channels_last: bool = True) -> list[dict]:
    """Distinct compilations of the traced calls: kernel name, dtype, constexprs, options, and
    the layers that use it."""
    from lanit_kernels import triton_adain, triton_conv

    found: dict[str, dict] = {}

    def add(kernel, dtype, constexprs, options, layer):
        name = DTYPE_NAMES[dtype]
        key = json.dumps([kernel.__name__, name, constexprs, options], sort_keys=True)
        entry = found.setdefault(key, dict(kernel=kernel.__name__, dtype=name, constexprs=constexprs,
                                           options=options, layers=[]))
        if layer not in entry["layers"]:
            entry["layers"].append(layer)

    for batch in batches:
        calls = trace_calls(size, batch, ops)
        for dtype in dtypes:
            for call in calls:
                hw = call["h"] * call["w"]
                layer = (f"b{batch} {call['c_in']}x{call['h']}x{call['w']}->{call['c_out']} "
                         f"k{call['k']}{' up' if call['upsample'] else ''}")
                plan = triton_adain.stats_plan(call["n"], call["c_in"], hw,
                                               channels_last and call["c_in"] > 1)
                stats_blocks = dict(BLOCK_C=plan["block_c"], BLOCK_HW=plan["block_hw"])
                stats_options = dict(num_warps=plan["num_warps"])
                if plan["num_chunks"] == 1:
                    add(triton_adain._adain_coeff_kernel, dtype, stats_blocks, stats_options, layer)
                else:
                    add(triton_adain._partial_stats_kernel, dtype, stats_blocks, stats_options, layer)
                    # The merge reads and writes fp32 only: one variant serves every dtype.
                    add(triton_adain._combine_coeff_kernel, torch.float32,
                        dict(BLOCK_C=plan["combine_c"]), dict(num_warps=plan["combine_warps"]), layer)
                _, constexprs, options = triton_conv.launch_config(
                    call["n"], call["c_in"], call["h"], call["w"], call["c_out"], call["k"],
                    call["upsample"], dtype, None, has_shift=True, has_act=call["has_act"],
                    has_bias=call["has_bias"], has_out_scale=False)
                add(triton_conv._conv_kernel, dtype, constexprs, options, layer)
    return list(found.values())


def _signature(kernel, dtype_name: str, constexprs: dict) -> dict:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype_name}"
        elif name in _FP32_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def ptxas_path(arch: int = 90) -> str:
    """The ptxas Triton itself assembles `arch` with. Triton 3.5+ carries a second, newer
    ptxas-blackwell for sm_100 and up (the PTX it writes there is a version the older one refuses);
    its knobs honour TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH."""
    import triton

    tools = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if tools is not None:
        tool = getattr(tools, "ptxas_blackwell", None) if arch >= 100 else None
        path = (tool or tools.ptxas).path
        if path:
            return path
    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not path.exists():
        raise FileNotFoundError(f"no ptxas in Triton's package ({path}); set TRITON_PTXAS_PATH")
    return str(path)


def ptxas_report(ptx: str) -> dict:
    """registers, spill store/load bytes of a PTX module (ptxas -v for the PTX's own .target)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    if target is None:
        raise ValueError("PTX without a .target line")
    with tempfile.TemporaryDirectory() as folder:
        src = Path(folder) / "kernel.ptx"
        src.write_text(ptx)
        arch = int(re.match(r"sm_(\d+)", target.group(1)).group(1))
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={target.group(1)}", str(src),
                               "-o", str(Path(folder) / "kernel.cubin")],
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip().splitlines()[-1:]}")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {proc.stderr.strip()[:200]}")
    return dict(target=target.group(1), registers=int(regs.group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one variant for sm_`arch`; the variant with the compile and ptxas figures added."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lanit_kernels import triton_adain, triton_conv

    kernel = getattr(triton_conv, variant["kernel"], None) or getattr(triton_adain, variant["kernel"])
    source = ASTSource(fn=kernel, signature=_signature(kernel, variant["dtype"], variant["constexprs"]),
                       constexprs=variant["constexprs"])
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=variant["options"])
    compile_s = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    return dict(variant, compile_s=round(compile_s, 2), ptx_lines=len(ptx.splitlines()),
                shared=compiled.metadata.shared, tensor_cores=bool(re.search(r"\b(w?gmma|mma)\.", ptx)),
                **ptxas_report(ptx))


def compile_all(arch: int, variant_list: list[dict], progress=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("lanit_kernels.aot needs TRITON_INTERPRET unset or 0")
    records = []
    for variant in variant_list:
        records.append(compile_variant(variant, arch))
        if progress is not None:
            progress(records[-1])
    return records


def _blocks_text(variant: dict) -> str:
    c = variant["constexprs"]
    if "BLOCK_M" in c:
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} k{c['KSIZE']}{' phases' if c['PHASES'] else ''}"
    return "x".join(str(c[k]) for k in ("BLOCK_C", "BLOCK_HW") if k in c)


HEADER = (f"{'kernel':<22} {'dtype':<5} {'blocks':<22} {'warps':>5} {'compile s':>9} {'PTX lines':>9} "
          f"{'regs':>4} {'spill B':>7} {'smem B':>7}  layers")


def format_row(record: dict) -> str:
    spill = record["spill_stores"] + record["spill_loads"]
    return (f"{record['kernel']:<22} {record['dtype']:<5} {_blocks_text(record):<22} "
            f"{record['options']['num_warps']:>5} {record['compile_s']:>9.2f} {record['ptx_lines']:>9} "
            f"{record['registers']:>4} {spill:>7} {record['shared']:>7}  {len(record['layers'])}")


def _json_lines(result: dict) -> str:
    """`result` as JSON with a field, and a variant, per line: read by people as well as parsed."""
    fields = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in result.items() if key != "variants"]
    if "variants" in result:
        rows = ",\n".join(f"  {json.dumps(variant)}" for variant in result["variants"])
        fields.append(f' "variants": [\n{rows}\n ]')
    return "{\n" + ",\n".join(fields) + "\n}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lanit_kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--size", type=int, default=256, help="image size gpu.sh runs")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_NAMES.values()),
                        default=["fp16", "bf16"])
    parser.add_argument("--ops", nargs="+", choices=GPU_SH_OPS, default=list(GPU_SH_OPS))
    parser.add_argument("--list", action="store_true", help="print the variant set, compile nothing")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not 70 <= args.arch <= 130:  # Triton's CUDA backend: Volta (70) and newer
        parser.error(f"--arch is a CUDA compute capability such as 80 or 90, got {args.arch}")
    if args.arch < 80 and "bf16" in args.dtypes:
        parser.error("bf16 kernels need --arch 80 or newer (the dispatcher falls back below)")
    if min(args.batches) < 1:
        parser.error("--batches must be at least 1")
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    try:
        from lanit_rt.config import LanitConfig

        LanitConfig(domains=("a", "b"), img_size=args.size)
        variant_list = variants(args.size, tuple(args.batches), tuple(by_name[d] for d in args.dtypes),
                                tuple(args.ops))
        result = {"arch": args.arch, "size": args.size, "batches": args.batches, "dtypes": args.dtypes,
                  "ops": args.ops, "variant_count": len(variant_list)}
        if args.list:
            result["variants"] = variant_list
        else:
            import triton

            print(HEADER, file=sys.stderr)
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TRITON_CACHE_DIR"] = cache  # fresh: real compile times, no stale hits
                start = time.perf_counter()
                records = compile_all(args.arch, variant_list,
                                      progress=lambda r: print(format_row(r), file=sys.stderr, flush=True))
                total = time.perf_counter() - start
            result.update(triton=triton.__version__, torch=torch.__version__,
                          total_compile_s=round(sum(r["compile_s"] for r in records), 1),
                          total_wall_s=round(total, 1),
                          max_spill_bytes=max(r["spill_stores"] + r["spill_loads"] for r in records),
                          max_registers=max(r["registers"] for r in records),
                          max_shared=max(r["shared"] for r in records), variants=records)
            print(f"{len(records)} variants for sm_{args.arch}: {result['total_compile_s']} s of "
                  f"compiles ({result['total_wall_s']} s with ptxas -v), max spill "
                  f"{result['max_spill_bytes']} B, max registers {result['max_registers']}, "
                  f"max shared {result['max_shared']} B (triton {triton.__version__})", file=sys.stderr)
    except Exception as err:
        print(f"lanit_kernels.aot: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    text = _json_lines(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
