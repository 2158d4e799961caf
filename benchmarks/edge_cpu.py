"""Edge CPUs: every CPU engine x precision x batch x size in one interleaved run, plus the
Translator's host overhead.

Models (random initialisation, seeded; no trained checkpoint is needed or downloaded):
- "64-small": 64 px at the training defaults' widths (base_dim 32, max_dim 128, mapping_dim 256);
- "256-stargan": 256 px at StarGAN v2 widths (base_dim None -> 64, max_dim 512, mapping_dim 512);
or, with `--checkpoint RUN`, that trained model instead (its size and domains; quantisation and
bf16 lose less on trained weights than on random ones).
Real images: the embedded default data (Twemoji people, `training.labeling.emoji.default_dataset`), resized
to the model size; the first images calibrate INT8, the last ones (never seen by calibration) are
the held-out set for PSNR.

Engines: onnxruntime fp32 (the baseline of every ratio), OpenVINO fp32 / bf16 / fp16 (bf16 and fp16
only where the CPU has them, else the row says why), onnxruntime INT8 QDQ (per-channel weights,
convolutions only; "mixed" keeps the first and last convolutions fp32) and the same QDQ graph in
OpenVINO, and OpenVINO + NNCF INT8 where nncf is installed. Each engine runs the exported
`domain_weights` graph with the same thread count; the timed calls of all engines alternate
(round-robin, warm-up first) so each sees the same machine load; medians are reported.

GFLOP/s: FLOPs of one generator forward (torch FlopCounterMode, 2 per MAC) x batch / median time.
fp32 peak: the best GFLOP/s of `torch.mm` on 1024x1024 fp32 matrices with the same thread count
(MKL/oneDNN sgemm), measured in the same run. PSNR: over [-1, 1] outputs against onnxruntime fp32 on
the held-out images (10 log10(4 / MSE)).

Host overhead: the Translator's time outside the graph at batch 1 (64-small): (a) with a null
backend (a host slot whose run() does nothing), the host fast path and the general path (uint8 ->
torch -> backend -> torch -> uint8) for a PIL image and a uint8 array; (b) the onnxruntime
Translator's translate(PIL) minus its bare bound graph call, interleaved.

    python benchmarks/edge_cpu.py [--quick] [--threads 2] [--iters 5] [--sizes 64-small 256-stargan]
                                  [--batches 1 8] [--engines LABEL ...] [--calib 32] [--heldout 16]
                                  [--checkpoint RUN]
                                  [--json benchmarks/results/edge_cpu.json]
"""

from __future__ import annotations

import argparse
import json
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

from lanit_rt import Generator, LanitConfig, LanitModel, MappingNetwork, StyleEncoder, Translator  # noqa: E402
from lanit_rt.backends.base import Backend, HostSlot  # noqa: E402
from lanit_rt.backends.openvino import cpu_capabilities, kept_signal_stack, openvino_core  # noqa: E402
from lanit_export.onnx_export import export_onnx  # noqa: E402
from lanit_export.quantize import psnr_db, quantize_onnx_int8  # noqa: E402

SIZES = {
    "64-small": dict(img_size=64, base_dim=32, max_dim=128, mapping_dim=256, latent_dim=16),
    "256-stargan": dict(img_size=256, base_dim=None, max_dim=512, mapping_dim=512),
}


def real_images(size: int, count: int) -> np.ndarray:
    """uint8 [count, size, size, 3]: Twemoji people (white background), antialiased resize."""
    from PIL import Image

    from lanit_rt.images import to_rgb
    from training.labeling.emoji import default_dataset

    paths, _ = default_dataset()
    rng = np.random.default_rng(0)
    chosen = rng.permutation(len(paths))[:count]
    images = [np.asarray(to_rgb(Image.open(paths[i])).resize((size, size), Image.BILINEAR)) for i in chosen]
    return np.stack(images)


def make_model(name: str, domains: tuple[str, ...]) -> LanitModel:
    """A SIZES model with random weights (seed 0), or the trained checkpoint at `name`."""
    if name not in SIZES:
        from lanit_rt import load_checkpoint

        return load_checkpoint(name)
    torch.manual_seed(0)
    config = LanitConfig(domains=domains, **SIZES[name])
    table = torch.randn(config.num_domains, config.style_dim)
    return LanitModel(config, Generator(config).eval(), MappingNetwork(config).eval(),
                      StyleEncoder(config).eval(), latent_table=table)


def gflop_per_image(model: LanitModel) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.img_size
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.generator(torch.zeros(1, 3, size, size), torch.zeros(1, model.config.style_dim))
    return counter.get_total_flops() / 1e9


def fp32_peak_gflops(threads: int, repeats: int = 20) -> float:
    """Best GFLOP/s of a 1024^3 fp32 matmul (2 * n^3 FLOPs) on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    torch.set_num_threads(previous)
    return 2 * 1024 ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _targets(n: int, d: int) -> np.ndarray:
    rows = np.zeros((n, d), np.float32)
    rows[np.arange(n), np.arange(n) % d] = 1
    return rows


def _float(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / np.float32(127.5) - 1).transpose(0, 3, 1, 2).copy()


def ort_engine(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    for key, value in ORT_NO_SPIN.items():  # idle workers would spin into the next engine's time
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(feeds):
        return session.run(["translated"], feeds)[0]

    run.session = session  # what tests read its settings from
    return run


def ov_engine(model_or_path, threads: int, precision: str):
    core = openvino_core()
    model = core.read_model(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
    compiled: dict = {}

    def run(feeds):
        n = feeds["image"].shape[0]
        if n not in compiled:
            clone = model.clone()
            clone.reshape({k: list(v.shape) for k, v in feeds.items()})
            with kept_signal_stack():
                cm = core.compile_model(clone, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                       "PERFORMANCE_HINT": "LATENCY",
                                                       "INFERENCE_NUM_THREADS": threads})
            compiled[n] = cm.create_infer_request()
        request = compiled[n]
        request.infer(feeds)
        return request.get_tensor("translated").data.copy()

    return run


def nncf_engine(path: Path, calibration: np.ndarray, d: int, threads: int, keep_ends: bool):
    import nncf
    model = openvino_core().read_model(str(path))
    calib = _float(calibration)
    targets = _targets(len(calib), d)
    items = [{"image": calib[i:i + 1], "domain_weights": targets[i:i + 1]} for i in range(len(calib))]
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    ignored = nncf.IgnoredScope(names=[convs[0], convs[-1]]) if keep_ends else None
    kwargs = {"ignored_scope": ignored} if ignored else {}
    with kept_signal_stack():  # NNCF compiles the model on a Core of its own
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **kwargs)
    return ov_engine(quantized, threads, "fp32")


class _NullBackend(Backend):
    """Runs nothing: the Translator's host path alone. host=False forces the general path."""

    name = "null"
    device = torch.device("cpu")

    def __init__(self, config: LanitConfig, host: bool):
        self.config, self.host = config, host

    def run_weights(self, images, weights):
        return images.clone()

    def host_slot(self, n):
        if not self.host:
            return None
        size = self.config.img_size
        image = np.empty((n, 3, size, size), np.float32)
        return HostSlot(image, np.empty((n, self.config.num_domains), np.float32), np.zeros_like(image),
                        lambda: None)


def host_overhead(model: LanitModel, onnx_path: Path, threads: int, image: np.ndarray, iters: int) -> dict:
    from PIL import Image
    pil = Image.fromarray(image)
    results = {}
    for label, host in (("fast", True), ("general", False)):
        translator = Translator(_NullBackend(model.config, host))
        for kind, x in (("pil", pil), ("numpy", image)):
            translator.translate(x, model.config.domains[0])
            times = [_timed(lambda: translator.translate(x, model.config.domains[0])) for _ in range(iters * 40)]
            results[f"null_{label}_{kind}_ms"] = statistics.median(times) * 1e3
    ort = Translator.from_onnx(onnx_path, threads=threads)
    slot = ort.backend.host_slot(1)
    ort.translate(pil, model.config.domains[0])
    bare, full = [], []
    for _ in range(iters * 4):
        bare.append(_timed(slot.run))
        full.append(_timed(lambda: ort.translate(pil, model.config.domains[0])))
    results["ort_bare_graph_ms"] = statistics.median(bare) * 1e3
    results["ort_translate_pil_ms"] = statistics.median(full) * 1e3
    results["ort_outside_graph_ms"] = results["ort_translate_pil_ms"] - results["ort_bare_graph_ms"]
    return results


def bench_size(name: str, batches: list[int], threads: int, iters: int, folder: Path, quick: bool,
               calib_count: int, held_count: int, only: list[str] | None = None) -> list[dict]:

    def want(label: str) -> bool:
        return label == "onnxruntime fp32" or not only or label in only

    model = make_model(name, ("blond hair", "black hair", "beard"))
    size, d = model.config.img_size, model.config.num_domains
    fp32_path = folder / f"{Path(name).name}.onnx"
    export_onnx(model, fp32_path, "fp32", validate=False, kinds=("domain_weights",))
    images = real_images(size, calib_count + held_count)
    calibration, heldout = images[:calib_count], images[calib_count:]

    engines: dict[str, object] = {"onnxruntime fp32": ort_engine(fp32_path, threads)}
    notes: dict[str, str] = {}
    recorded_psnr: dict[str, float] = {}
    try:
        capabilities = cpu_capabilities()
        if want("openvino fp32"):
            engines["openvino fp32"] = ov_engine(fp32_path, threads, "fp32")
        for precision, flag in (("bf16", "BF16"), ("fp16", "FP16")):
            if not want(f"openvino {precision}"):
                continue
            if flag in capabilities:
                engines[f"openvino {precision}"] = ov_engine(fp32_path, threads, precision)
            else:
                notes[f"openvino {precision}"] = f"CPU lacks {flag} ({', '.join(capabilities)})"
    except ImportError:
        notes["openvino"] = "openvino not installed"
    recipes = [("int8 mixed", True, "minmax")]
    if not quick:
        recipes = [("int8 convs", False, "minmax"), *recipes, ("int8 mixed pct", True, "percentile")]
    for label, keep_ends, method in recipes:
        if not (want(f"onnxruntime {label}") or want(f"openvino QDQ {label}")):
            continue
        path = folder / f"{Path(name).name}.{label.replace(' ', '_')}.onnx"
        recorded_psnr[label] = quantize_onnx_int8(fp32_path, path, calibration, heldout, keep_ends, method)
        if want(f"onnxruntime {label}"):
            engines[f"onnxruntime {label}"] = ort_engine(path, threads)
        if "openvino fp32" in engines and label == "int8 mixed" and want(f"openvino QDQ {label}"):
            engines[f"openvino QDQ {label}"] = ov_engine(path, threads, "fp32")
    try:
        if quick:
            raise ImportError("--quick leaves NNCF out")
        import nncf  # noqa: F401
        if "openvino fp32" in engines:
            for label, keep_ends in (("openvino nncf int8", False), ("openvino nncf int8 mixed", True)):
                if want(label):
                    engines[label] = nncf_engine(fp32_path, calibration, d, threads, keep_ends)
    except ImportError:
        notes["openvino nncf"] = "left out by --quick" if quick else "nncf not installed"

    for label in only or []:
        if label not in engines and label not in notes:
            print(f"warning: --engines {label!r} matches no engine of {name} (labels as printed)",
                  file=sys.stderr)
    held = {"image": _float(heldout), "domain_weights": _targets(len(heldout), d)}
    reference = engines["onnxruntime fp32"](held)
    psnr = {label: psnr_db(reference, run(held)) for label, run in engines.items()}

    gflop = gflop_per_image(model)
    rows = []
    for batch in batches:
        reps = np.concatenate([heldout] * (batch // len(heldout) + 1))[:batch]
        feeds = {"image": _float(reps), "domain_weights": _targets(batch, d)}
        for run in engines.values():
            run(feeds)  # warm-up (compiles OpenVINO's static shape)
        times = {label: [] for label in engines}
        for _ in range(iters):
            for label, run in engines.items():
                times[label].append(_timed(lambda: run(feeds)))
        base = statistics.median(times["onnxruntime fp32"])
        for label in engines:
            median = statistics.median(times[label])
            rows.append({"model": name, "img_size": size, "batch": batch, "engine": label,
                         "ms": median * 1e3, "speedup_vs_ort_fp32": base / median,
                         "gflops": gflop * batch / median, "psnr_db": psnr[label],
                         "recorded_psnr_db": recorded_psnr.get(label.replace("onnxruntime ", ""))})
        for label, why in notes.items():
            rows.append({"model": name, "img_size": size, "batch": batch, "engine": label, "skipped": why})
    host = host_overhead(model, fp32_path, threads, heldout[0], iters) if name == "64-small" else None
    return rows, host, gflop


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked, with --quick's defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: one int8 recipe, no NNCF; and unless given, --sizes 64-small "
                             "--batches 1 --iters 1 --calib 4 --heldout 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, help="timed runs per engine (default 5)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help=f"default: {' '.join(SIZES)}")
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 8")
    parser.add_argument("--engines", nargs="+", metavar="LABEL",
                        help="keep only these engines (labels as printed; onnxruntime fp32 always runs)")
    parser.add_argument("--calib", type=int, help="calibration images (default 32)")
    parser.add_argument("--heldout", type=int, help="held-out PSNR images (default 16)")
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="measure this trained run's generator instead of the --sizes models")
    parser.add_argument("--json", default="benchmarks/results/edge_cpu.json")
    args = parser.parse_args(argv)
    if args.checkpoint and args.sizes:
        parser.error("--checkpoint measures that run's generator: leave out --sizes")
    # --quick picks small defaults; what is given on the command line still counts
    args.sizes = args.sizes or (["64-small"] if args.quick else list(SIZES))
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    for name, quick, full in (("iters", 1, 5), ("calib", 4, 32), ("heldout", 2, 16)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for flag, value in (("--threads", args.threads), ("--iters", args.iters), ("--batches", min(args.batches)),
                        ("--calib", args.calib), ("--heldout", args.heldout)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.json:
        from lanit_rt.checkpoint import OutputPathError, check_output_file
        try:
            check_output_file(args.json)
        except OutputPathError as err:
            parser.error(f"--json {args.json}: {err}")
    if args.checkpoint:
        from lanit_rt import CheckpointError, read_checkpoint_config

        try:
            read_checkpoint_config(args.checkpoint)
        except (CheckpointError, ValueError, OSError) as err:
            parser.error(f"--checkpoint {args.checkpoint}: {err}")
        args.sizes = [args.checkpoint]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = args.sizes
    batches, iters = args.batches, args.iters
    torch.set_num_threads(args.threads)
    peak = fp32_peak_gflops(args.threads, 5 if args.quick else 20)
    machine = describe("edge_cpu.py", argv, args.threads, "onnxruntime", "openvino", "nncf")
    machine.update(fp32_peak_gflops=peak, peak_method="best torch.mm 1024^3 fp32")
    results = {"machine": machine, "settings": {"sizes": sizes, "batches": batches, "iters": iters,
                                                "calib": args.calib, "heldout": args.heldout,
                                                "engines": args.engines, "quick": args.quick},
               "rows": [], "host_overhead": None, "gflop_per_image": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            rows, host, gflop = bench_size(name, batches, args.threads, iters, Path(tmp), args.quick,
                                           args.calib, args.heldout, args.engines)
            results["rows"] += rows
            results["gflop_per_image"][name] = gflop
            if host is not None:
                results["host_overhead"] = host
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags'])}); fp32 reference: torch.mm 1024^3, "
          f"{args.threads} threads: {peak:.1f} GFLOP/s")
    print(f"{'model':>12} {'batch':>5} {'engine':>28} {'ms':>9} {'x ORT fp32':>10} {'GFLOP/s':>8} "
          f"{'% mm':>6} {'PSNR dB':>8}")
    for r in results["rows"]:
        if "skipped" in r:
            print(f"{r['model']:>12} {r['batch']:>5} {r['engine']:>28}  skipped: {r['skipped']}")
            continue
        print(f"{r['model']:>12} {r['batch']:>5} {r['engine']:>28} {r['ms']:>9.2f} {r['speedup_vs_ort_fp32']:>10.2f} "
              f"{r['gflops']:>8.1f} {100 * r['gflops'] / peak:>6.0f} {r['psnr_db']:>8.1f}")
    if results["host_overhead"]:
        print("host overhead, batch 1, 64 px (ms):",
              ", ".join(f"{k} {v:.3f}" for k, v in results["host_overhead"].items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
