"""Throughput and latency of LANIT translation, per backend, batch size and resolution.

Two kinds of rows:
- "generator": the bare network on device-resident inputs (torch eager G(x, adain_params=...) in
  fp32 and in the chosen dtype, optionally torch.compile; onnxruntime InferenceSession.run on numpy).
- "translator": end to end through lanit_rt.Translator, uint8 numpy [N, H, W, 3] in, uint8 numpy
  out (conversion, upload, generator, download), for each backend (torch, torch + CUDA graphs,
  onnxruntime, tensorrt when an engine is given).

Reported per row: images/s (batch / mean latency), p50 and p99 latency of one batch in ms. The table
ends with the ratios onnxruntime / torch eager fp32. Results, with the device name, thread counts and
model configs, go to a JSON file.

    python benchmarks/throughput.py --quick                 # this machine's CPU, small model, ~minutes
    python benchmarks/throughput.py --device cuda --sizes 256 --batch-sizes 1,8,32,64 --cuda-graphs --compile
"""

from __future__ import annotations

import argparse
import json
import shlex
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lanit_rt import (  # noqa: E402
    Generator,
    LanitConfig,
    MappingNetwork,
    StyleEncoder,
    Translator,
    latent_style_table,
    load_checkpoint,
    save_checkpoint,
)

DOMAINS = ("blond hair", "black hair", "brown hair", "red hair", "white hair", "bald", "beard",
           "smiling", "eyeglasses", "bangs")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int,
            min_seconds: float) -> list[float]:
    """Latencies in seconds of `fn()` after `warmup` calls; at least `iters` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 20 * iters:
            break
    return times


def summarise(times: list[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)
    p99_index = min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))
    mean = statistics.fmean(times)
    return {"images_per_s": batch / mean, "mean_ms": 1e3 * mean,
            "p50_ms": 1e3 * statistics.median(times), "p99_ms": 1e3 * ordered[p99_index],
            "iters": len(times)}


def make_checkpoint(folder: Path, config: LanitConfig) -> Path:
    """A randomly initialised checkpoint (speed does not depend on the weights)."""
    torch.manual_seed(0)
    mapping = MappingNetwork(config)
    save_checkpoint(folder, config, Generator(config), mapping, StyleEncoder(config),
                    latent_table=latent_style_table(mapping, num_z=64))
    return folder


def export_onnx_artifact(checkpoint: Path, out: Path) -> Path | None:
    """OUT.onnx via the project's exporter (lanit_export/), or None when it (or its deps) is missing."""
    from lanit_export.errors import MissingDependencyError

    try:
        from lanit_export.onnx_export import export_onnx

        export_onnx(load_checkpoint(checkpoint), out, precision="fp32", validate=True)
    except (ImportError, MissingDependencyError) as err:  # the `onnx` extra is not installed
        print(f"  onnx export unavailable ({err}); skipping onnxruntime rows", file=sys.stderr)
        return None
    return out


def bench_size(args, size: int, config: LanitConfig, workdir: Path, device: torch.device,
               dtype: torch.dtype) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ckpt = make_checkpoint(workdir / f"ckpt{size}", config)
    onnx_path = None
    if "onnxruntime" in args.backends:
        t0 = time.perf_counter()
        onnx_path = export_onnx_artifact(ckpt, workdir / f"ckpt{size}" / "model.onnx")
        if onnx_path is not None:
            seconds = time.perf_counter() - t0
            print(f"  exported {onnx_path.name} at {size}px in {seconds:.1f} s", file=sys.stderr)

    model = load_checkpoint(ckpt, device=device)
    generator = model.generator
    d = config.num_domains
    table = generator.adain_params(model.style_table.to(device)).detach()  # [D, P] fp32
    low = None
    if dtype != torch.float32:
        low = Generator(config).to(device)
        low.load_state_dict(generator.state_dict())
        low = low.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)
    compiled = torch.compile(low if low is not None else generator) if args.compile else None

    translators: dict[str, Translator] = {}
    if "torch" in args.backends:
        translators["torch"] = Translator.from_checkpoint(ckpt, device=device, dtype=dtype, impl=args.impl)
        if args.cuda_graphs and device.type == "cuda":
            translators["torch+graphs"] = Translator.from_checkpoint(ckpt, device=device, dtype=dtype,
                                                                     impl=args.impl, cuda_graphs=True)
    ort_session = None
    if onnx_path is not None:
        ort = Translator.from_onnx(onnx_path, device=device if args.ort_gpu else "cpu",
                                   threads=args.threads)
        translators["onnxruntime"] = ort
        ort_session = ort.backend.graphs["domain_weights"].session
    if "tensorrt" in args.backends and args.engine:
        translators["tensorrt"] = Translator.from_engine(args.engine, device=device)

    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
        weights = torch.zeros(batch, d, device=device)
        weights[:, 0] = 1.0
        params = weights @ table

        def record(path: str, backend: str, precision: str, fn: Callable[[], Any]) -> None:
            try:
                with torch.inference_mode():
                    times = measure(fn, device, args.iters, args.warmup, args.min_seconds)
            except Exception as err:  # a backend failing must not hide the other rows
                print(f"  {path}/{backend} {size}px batch {batch}: failed: {err}", file=sys.stderr)
                return
            row = {"path": path, "backend": backend, "dtype": precision, "size": size, "batch": batch,
                   **summarise(times, batch)}
            rows.append(row)
            print(f"  {path:10s} {backend:14s} {precision:5s} {size:4d}px b{batch:<3d} "
                  f"{row['images_per_s']:10.1f} img/s  p50 {row['p50_ms']:9.2f} ms  "
                  f"p99 {row['p99_ms']:9.2f} ms", file=sys.stderr)

        record("generator", "torch eager", "fp32",
               lambda: generator(x, adain_params=params, impl="ref"))
        if low is not None:
            x_low = x.to(dtype).contiguous(memory_format=torch.channels_last)
            # impl "auto" runs the Triton kernels on CUDA: the row says which it was
            label = "torch eager" if args.impl == "ref" or device.type != "cuda" else f"torch impl={args.impl}"
            record("generator", label, precision_name(dtype),
                   lambda: low(x_low, adain_params=params, impl=args.impl))
        if compiled is not None:
            x_c = x.to(dtype).contiguous(memory_format=torch.channels_last) if low is not None else x
            record("generator", "torch.compile", precision_name(dtype),
                   lambda: compiled(x_c, adain_params=params, impl="ref"))
        if ort_session is not None:
            feeds = {"image": x.cpu().numpy(), "domain_weights": weights.cpu().numpy()}
            record("generator", "onnxruntime", "fp32", lambda: ort_session.run(["translated"], feeds))

        images = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
        for name, translator in translators.items():
            precision = precision_name(dtype) if name.startswith("torch") else translator.backend.precision
            record("translator", name, precision, lambda t=translator: t.translate(images, DOMAINS[0]))
    return rows


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """images/s of onnxruntime over torch eager fp32, per (path, size, batch)."""
    out = []
    index = {(r["path"], r["backend"], r["dtype"], r["size"], r["batch"]): r for r in rows}
    for (path, backend, dtype, size, batch), row in index.items():
        if backend != "onnxruntime":
            continue
        torch_name = "torch eager" if path == "generator" else "torch"
        base = index.get((path, torch_name, "fp32", size, batch))
        if base is not None:
            out.append({"path": path, "size": size, "batch": batch,
                        "onnxruntime_over_torch_fp32": row["images_per_s"] / base["images_per_s"]})
    return out


def print_table(rows: list[dict[str, Any]], ratio_rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    print("| path | backend | dtype | size | batch | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['backend']} | {r['dtype']} | {r['size']} | {r['batch']} | "
              f"{r['images_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    if ratio_rows:
        print()
        print("| path | size | batch | onnxruntime / torch eager fp32 |")
        print("|---|---:|---:|---:|")
        for r in ratio_rows:
            print(f"| {r['path']} | {r['size']} | {r['batch']} | {r['onnxruntime_over_torch_fp32']:.2f}x |")


BACKENDS = ("torch", "onnxruntime", "tensorrt")


def _positive_ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: comma-separated whole numbers, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag}: numbers of at least 1, got {text!r}")
    return values


def check_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every setting that would fail later (after checkpoints are built and timed) fails here."""
    from lanit_kernels.dispatch import IMPLS
    from lanit_rt.checkpoint import OutputPathError, check_output_file
    from lanit_rt.config import ConfigError
    from lanit_rt.translator import check_device, resolve_dtype

    try:
        device = check_device(args.device)
        resolve_dtype(args.dtype, device)
    except ValueError as err:
        parser.error(str(err))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.impl not in IMPLS:
        parser.error(f"--impl must be one of {IMPLS}, got {args.impl!r}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be at least 1 and --warmup at least 0, got {args.iters} / {args.warmup}")
    if args.engine is not None:
        from lanit_rt.backends.base import ArtifactError
        from lanit_rt.backends.tensorrt import read_sidecar

        try:
            read_sidecar(args.engine)
        except ArtifactError as err:
            parser.error(f"--engine: {err}")
    for size in args.sizes:
        try:
            LanitConfig(domains=DOMAINS, img_size=size, base_dim=args.base_dim, max_dim=args.max_dim)
        except ConfigError as err:
            parser.error(f"--sizes {size}: {err}")
    if args.out is not None:
        try:
            check_output_file(args.out)
        except OutputPathError as err:
            parser.error(f"--out: {err}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small model (base_dim 32, max_dim 128) at 64 px, batches 1 and 8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None,
                        help="fp32 | fp16 | bf16 (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--impl", default="auto", help="kernel impl for the Translator's generator")
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8,32,64)")
    parser.add_argument("--sizes", default=None, help="comma-separated resolutions (default 256)")
    parser.add_argument("--base-dim", type=int, default=None)
    parser.add_argument("--max-dim", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=None)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile generator row")
    parser.add_argument("--ort-gpu", action="store_true", help="run onnxruntime with its CUDA provider")
    parser.add_argument("--engine", default=None, help="a TensorRT engine (with .json sidecar) to time")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and onnxruntime (default: their own defaults)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/throughput-<device>.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown or not args.backends:
        parser.error(f"--backends: choose from {','.join(BACKENDS)} (got {unknown or 'none'})")
    args.batch_sizes = _positive_ints(parser, "--batch-sizes", args.batch_sizes or ("1,8" if quick else "1,8,32,64"))
    args.sizes = _positive_ints(parser, "--sizes", args.sizes or ("64" if quick else "256"))
    if quick:
        args.base_dim = args.base_dim or 32
        args.max_dim = args.max_dim or 128
    args.max_dim = args.max_dim or 512
    args.iters = args.iters if args.iters is not None else (5 if quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    check_settings(parser, args)
    args.min_seconds = args.min_seconds if args.min_seconds is not None else (1.0 if quick else 2.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from lanit_rt.translator import resolve_dtype
    dtype = resolve_dtype(args.dtype, device)
    name = device_name(device)
    print(f"device: {name}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    configs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            config = LanitConfig(domains=DOMAINS, img_size=size, base_dim=args.base_dim,
                                 max_dim=args.max_dim)
            configs[size] = config.to_dict()
            rows += bench_size(args, size, config, Path(tmp), device, dtype)
    ratio_rows = ratios(rows)
    print_table(rows, ratio_rows, f"\nLANIT throughput on {name} (torch {torch.__version__})\n")
    result = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "ort_threads": args.threads or "default",
              "load_average_after": os.getloadavg(), "quick": args.quick,
              "dtype": precision_name(dtype), "impl": args.impl, "configs": configs,
              "rows": rows, "ratios": ratio_rows,
              "command": shlex.join(["python", "benchmarks/throughput.py", *(argv or sys.argv[1:])])}
    try:
        import onnxruntime
        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
