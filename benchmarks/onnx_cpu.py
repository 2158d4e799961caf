"""The exported generator in onnxruntime (CPU) vs PyTorch eager, measured in one run.

For each image size (default 64/128/256, StarGAN v2 default widths: base_dim = 2**14 // size,
max_dim 512) a randomly initialised generator with a random per-domain style table is exported with
lanit_export.onnx_export (the `domain_weights` graph), checked once against PyTorch (max abs error), then
timed. PyTorch eager runs `G(x, style=model.domain_style(w))` under inference_mode; onnxruntime runs
the graph with the same thread count. The two are timed alternately (warm-up first), so both see the
same machine load; the table reports medians and the ratio eager / onnxruntime (> 1: ORT faster).

    python benchmarks/onnx_cpu.py [--sizes 64 128 256] [--batch 1] [--iters 7] [--threads N]
                                  [--fp16] [--json benchmarks/results/onnx_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_machine import ORT_NO_SPIN, describe, quiet_openmp  # noqa: E402

quiet_openmp()  # before torch loads (bench_machine.py says why)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lanit_rt import Generator, LanitConfig, LanitModel  # noqa: E402
from lanit_rt.checkpoint import OutputPathError, check_output_file  # noqa: E402
from lanit_export.onnx_export import export_onnx  # noqa: E402
from lanit_export.validate import onnx_runner  # noqa: E402

DOMAINS = ("blond hair", "black hair", "beard")


def make_model(size: int, seed: int = 0) -> LanitModel:
    torch.manual_seed(seed)
    config = LanitConfig(domains=DOMAINS, img_size=size)
    generator = Generator(config).eval().requires_grad_(False)
    table = torch.randn(config.num_domains, config.style_dim)
    return LanitModel(config, generator, latent_table=table)


def gflop_per_image(model: LanitModel) -> float:
    """FLOPs of one generator forward (torch's FlopCounterMode: convs and matmuls, 2 per MAC) / 1e9."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.img_size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.generator(torch.zeros(1, 3, size, size), torch.zeros(1, model.config.style_dim))
    return counter.get_total_flops() / 1e9


def bench_size(size: int, batch: int, iters: int, threads: int, precision: str, folder: Path) -> dict:
    model = make_model(size)
    path = folder / f"g{size}_{precision}.onnx"
    t0 = time.perf_counter()
    export_onnx(model, path, precision, validate=False, kinds=("domain_weights",))
    export_s = time.perf_counter() - t0
    run_ort = onnx_runner(path, threads=threads, config=ORT_NO_SPIN)

    gen = torch.Generator().manual_seed(size)
    image = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    weights = torch.zeros(batch, len(DOMAINS))
    weights[:, 0] = 1
    weights[:, -1] = 1  # a multi-hot target
    inputs = {"image": image.numpy(), "domain_weights": weights.numpy()}

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return model.generator(image, model.domain_style(weights))

    max_err = float(np.abs(run_ort(inputs) - run_torch().numpy()).max())  # also the warm-up
    torch_ms, ort_ms = [], []
    for _ in range(iters):
        t = time.perf_counter()
        run_torch()
        torch_ms.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        run_ort(inputs)
        ort_ms.append((time.perf_counter() - t) * 1e3)
    eager, ort = statistics.median(torch_ms), statistics.median(ort_ms)
    gflop = gflop_per_image(model) * batch
    return {
        "img_size": size, "batch": batch, "precision": precision,
        "params_m": sum(p.numel() for p in model.generator.parameters()) / 1e6,
        "gflop": gflop, "export_s": export_s, "max_abs_err": max_err,
        "eager_ms": eager, "ort_ms": ort, "ratio_eager_over_ort": eager / ort,
        "eager_gflops": gflop / (eager / 1e3), "ort_gflops": gflop / (ort / 1e3),
        "eager_ms_all": torch_ms, "ort_ms_all": ort_ms,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fp16", action="store_true", help="also time the fp16 graph in onnxruntime")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "onnx_cpu.json"))
    args = parser.parse_args(argv)
    if min(args.batch, args.iters, args.threads) < 1:
        parser.error("--batch, --iters and --threads must be at least 1")
    for size in args.sizes:
        try:
            LanitConfig(domains=DOMAINS, img_size=size)
        except ValueError as err:
            parser.error(f"--sizes {size}: {err}")
    try:
        check_output_file(args.json)
    except OutputPathError as err:
        parser.error(f"--json: {err}")
    try:
        import onnxruntime
    except ImportError:
        parser.error("onnxruntime is not installed: pip install 'lanit-rt[onnx]'")
    torch.set_num_threads(args.threads)

    rows = []
    precisions = ["fp32", "fp16"] if args.fp16 else ["fp32"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for precision in precisions:
                rows.append(bench_size(size, args.batch, args.iters, args.threads, precision, Path(tmp)))
                r = rows[-1]
                print(f"done {size}px {precision}: eager {r['eager_ms']:.1f} ms, ort {r['ort_ms']:.1f} ms",
                      file=sys.stderr)
    machine = {**describe("onnx_cpu.py", argv, args.threads, "onnxruntime", "lanit_rt"),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    # the eager side is always the fp32 PyTorch model: an fp16 row compares it with ORT's fp16 graph
    header = (f"{'size':>5} {'ORT':>5} {'batch':>5} {'GFLOP':>7} {'fp32 eager ms':>13} {'ORT ms':>9} "
              f"{'eager/ORT':>9} {'ORT GFLOP/s':>11} {'max err':>9}")
    print(f"onnxruntime CPU vs PyTorch eager ({machine['cpu']}, {args.threads} threads, "
          f"load {load_before[0]:.1f})")
    print(header)
    for r in rows:
        print(f"{r['img_size']:>5} {r['precision']:>5} {r['batch']:>5} {r['gflop']:>7.1f} "
              f"{r['eager_ms']:>13.1f} {r['ort_ms']:>9.1f} {r['ratio_eager_over_ort']:>9.2f} "
              f"{r['ort_gflops']:>11.1f} {r['max_abs_err']:>9.2e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "onnx_cpu", "machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
