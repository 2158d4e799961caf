"""`lanit-export`: ONNX graphs, OpenVINO IRs, TensorRT engines and Triton model repositories of a
LANIT checkpoint's generator.

    lanit-export CHECKPOINT --onnx OUT.onnx [--fp16]
    lanit-export CHECKPOINT --openvino OUT.xml      (OpenVINO IR: OUT.xml/.bin, OUT.style.xml/.bin)
    lanit-export CHECKPOINT --trt fp16|fp32 [--onnx-path P] [--min-batch N] [--opt-batch N]
                 [--max-batch N] [--out OUT.engine]   (default OUT: CHECKPOINT_DIR/model.engine)
    lanit-export CHECKPOINT --triton-repo DIR [--fp16 | --trt P] [--triton-backend B] [--max-batch N]
                 (a Triton model repository: lanit_export.triton_repo)

Every artifact is validated against the PyTorch generator before it is written; the max abs errors
are printed. Errors (missing/foreign checkpoint, unknown precision, empty batch range, unusable
--device, an output path that cannot be written, missing optional dependency, failed validation,
file-system errors) print one line `lanit-export: error: ...` and exit non-zero. Arguments, the
device and the output paths are checked before the checkpoint is loaded or anything is traced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from lanit_export.command import Parser, UsageError, run_command
from lanit_export.errors import ExportError
from lanit_rt.errors import first_line


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lanit-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint folder or model.safetensors")
    target = parser.add_mutually_exclusive_group(required=False)  # one of them or --triton-repo
    target.add_argument("--onnx", metavar="OUT.onnx", help="write OUT.onnx and OUT.style.onnx")
    target.add_argument("--trt", metavar="PRECISION", help="build a TensorRT engine: fp16 or fp32")
    target.add_argument("--openvino", metavar="OUT.xml",
                        help="write an OpenVINO IR (OUT.xml + OUT.bin, and OUT.style.xml + .bin)")
    parser.add_argument("--fp16", action="store_true", help="(--onnx) fp16 graph, fp32 norm statistics")
    parser.add_argument("--onnx-path", metavar="P", help="(--trt) build from this ONNX graph")
    parser.add_argument("--min-batch", type=_int, help="(--trt) smallest batch (default 1)")
    parser.add_argument("--opt-batch", type=_int, help="(--trt) batch to tune for (default 8)")
    parser.add_argument("--max-batch", type=_int, help="largest batch: of the engine's profile "
                        "(--trt, default 32) or of the Triton model (--triton-repo, default 16)")
    parser.add_argument("--out", metavar="OUT.engine",
                        help="(--trt) engine path (default: CHECKPOINT_DIR/model.engine, where "
                             "Translator.from_checkpoint(..., backend='tensorrt') looks)")
    parser.add_argument("--device", default="cpu", help="device for the PyTorch reference (default cpu)")
    _add_triton_arguments(parser)
    return parser


def _refuse_given(flags: dict[str, object], where: str) -> None:
    """UsageError naming every flag in `flags` that was given (its value not None) and `where` it
    applies ("only with --trt"): a flag another target ignores is refused, not dropped."""
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} {where}")


def _check_device(text: str) -> None:
    """Raise UsageError unless `text` names a torch device that works on this machine."""
    import torch  # noqa: PLC0415 (keeps --help fast)

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown --device {text!r}; use e.g. cpu, cuda or cuda:1") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text} cannot run the reference model; use cpu, cuda or cuda:N")
    try:
        torch.empty(0, device=device)
    except Exception as err:  # torch says "unusable device" as RuntimeError, AssertionError, ...
        reason = first_line(err)
        raise UsageError(f"--device {text} is not available on this machine: {reason}") from None


def _run(args: argparse.Namespace) -> None:
    from lanit_rt import load_checkpoint  # noqa: PLC0415 (keeps --help fast)
    from lanit_rt.checkpoint import read_checkpoint_config  # noqa: PLC0415
    from lanit_rt.translator import ENGINE_FILE  # noqa: PLC0415

    from lanit_export.graph_spec import PRECISIONS  # noqa: PLC0415
    from lanit_export.onnx_export import check_output_path, style_graph_path  # noqa: PLC0415

    for name in ("checkpoint", "onnx", "onnx_path", "out"):  # "~/x" from a quoted or --flag=~ path
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).expanduser()))
    if args.triton_repo is not None:
        return _run_triton(args)
    _refuse_given({"--triton-backend": args.triton_backend, "--triton-name": args.triton_name,
                   "--instances": args.instances, "--max-queue-delay-us": args.max_queue_delay_us},
                  "only with --triton-repo DIR")
    if args.openvino is not None:
        return _run_openvino(args)
    if args.onnx is None and args.trt is None:
        raise UsageError("one of the arguments --onnx --trt --openvino is required (or --triton-repo DIR)")

    if args.onnx is not None:
        _refuse_given({"--onnx-path": args.onnx_path, "--min-batch": args.min_batch,
                       "--opt-batch": args.opt_batch, "--out": args.out}, "only with --trt")
        _refuse_given({"--max-batch": args.max_batch}, "only with --trt or --triton-repo DIR")
        if Path(args.onnx).suffix != ".onnx":  # ".onnx" alone is a hidden file without a suffix
            raise UsageError(f"--onnx needs a file name ending in .onnx (e.g. model.onnx), got {args.onnx!r}")
    else:
        if args.trt not in PRECISIONS:
            raise UsageError(f"unknown precision {args.trt!r} for --trt; choose one of {list(PRECISIONS)}")
        if args.fp16:
            raise UsageError("--fp16 applies to --onnx; use --trt fp16 for an fp16 engine")

    if args.trt is not None:
        from lanit_export.tensorrt import batch_profile, import_tensorrt  # noqa: PLC0415

        profile = batch_profile(args.min_batch, args.opt_batch, args.max_batch)
        import_tensorrt()  # fail before loading anything when TensorRT is missing

    _check_device(args.device)
    read_checkpoint_config(args.checkpoint)  # a missing or foreign checkpoint, before any folder is made
    if args.onnx is not None:
        outputs = [Path(args.onnx), style_graph_path(args.onnx)]
    else:
        ckpt = Path(args.checkpoint)
        folder = ckpt if ckpt.is_dir() else ckpt.parent
        engine = Path(args.out) if args.out else folder / ENGINE_FILE
        outputs = [engine]
    for output in outputs:
        check_output_path(output)  # before loading and tracing, which take a while

    model = load_checkpoint(args.checkpoint, device=args.device)

    if args.onnx is not None:
        from lanit_export.onnx_export import export_onnx  # noqa: PLC0415

        precision = "fp16" if args.fp16 else "fp32"
        artifacts = export_onnx(model, args.onnx, precision, log=print)
        for artifact in artifacts:
            print(f"wrote {artifact.path} ({artifact.kind}, {precision}, opset {artifact.summary.opset})")
        return

    from lanit_export.tensorrt import export_tensorrt  # noqa: PLC0415

    artifact = export_tensorrt(model, engine, args.trt, profile, onnx_path=args.onnx_path, log=print)
    print(f"wrote {artifact.path} ({args.trt}, batch {profile.min}..{profile.max}, opt {profile.opt}) "
          f"and {artifact.sidecar}")


# --- Triton model repositories (lanit_export.triton_repo) ---------------------------------------------
TRITON_BACKENDS = ("onnxruntime", "tensorrt", "python")


def _add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Triton model repository", "--triton-repo DIR writes DIR/NAME/{config.pbtxt, 1/model.onnx | "
        "1/model.plan | 1/model.py}: the ONNX graph (default; with --onnx it is also kept there), a "
        "TensorRT engine (--trt), or a Python-backend model over lanit_rt (--triton-backend python)")
    group.add_argument("--triton-repo", metavar="DIR", help="write a Triton model repository")
    group.add_argument("--triton-backend", choices=TRITON_BACKENDS,
                       help="onnxruntime (default), tensorrt (implied by --trt) or python")
    # Defaults are applied in _run_triton: None says "not given", so that these flags without
    # --triton-repo are refused rather than dropped.
    group.add_argument("--triton-name", help="model name (default lanit)")
    group.add_argument("--instances", type=_int, help="model instances (default 1)")
    group.add_argument("--max-queue-delay-us", type=_int, help="dynamic batcher delay (default 2000)")


def _run_triton(args: argparse.Namespace) -> None:
    from lanit_rt import load_checkpoint  # noqa: PLC0415
    from lanit_rt.checkpoint import read_checkpoint_config  # noqa: PLC0415

    from lanit_export import triton_repo  # noqa: PLC0415
    from lanit_export.onnx_export import check_output_path  # noqa: PLC0415

    if args.openvino is not None:
        raise UsageError("--openvino and --triton-repo exclude each other (the repository serves the "
                         "ONNX graph, a TensorRT engine or the Python backend)")
    name = triton_repo.DEFAULT_NAME if args.triton_name is None else args.triton_name
    given = {key: value for key, value in (("instances", args.instances),
                                           ("max_queue_delay_us", args.max_queue_delay_us))
             if value is not None}  # the others: ServingOptions' defaults
    backend = args.triton_backend or ("tensorrt" if args.trt is not None else "onnxruntime")
    if (backend == "tensorrt") != (args.trt is not None):
        raise UsageError("--triton-backend tensorrt needs --trt PRECISION, and --trt writes a tensorrt model")
    if args.trt is not None and args.fp16:
        raise UsageError("--fp16 applies to ONNX models; use --trt fp16 for an fp16 engine")
    if backend == "python" and args.fp16:
        raise UsageError("--triton-backend python serves the fp32 ONNX graph; leave out --fp16")
    if args.trt is None:
        _refuse_given({"--onnx-path": args.onnx_path, "--min-batch": args.min_batch,
                       "--opt-batch": args.opt_batch, "--out": args.out}, "only with --trt")
    if args.onnx is not None and Path(args.onnx).suffix != ".onnx":
        raise UsageError(f"--onnx needs a file name ending in .onnx, got {args.onnx!r}")
    if args.trt is not None and args.onnx is not None:
        raise UsageError("--onnx and --trt exclude each other")
    kind = "KIND_GPU" if backend == "tensorrt" or args.device.startswith("cuda") else "KIND_CPU"
    try:
        if args.trt is not None:
            from lanit_export.tensorrt import batch_profile, import_tensorrt  # noqa: PLC0415

            profile = batch_profile(args.min_batch, args.opt_batch, args.max_batch)
            triton_repo.check_served_profile(profile, "the engine")  # before the export
            options = triton_repo.ServingOptions(max_batch=profile.max, kind=kind, **given)
        else:
            if args.max_batch is not None:
                given["max_batch"] = args.max_batch
            options = triton_repo.ServingOptions(kind=kind, **given)
    except ExportError as err:
        raise UsageError(str(err)) from None
    triton_repo._check_name(name)
    repo = Path(args.triton_repo).expanduser()
    if (repo / name).exists():
        raise UsageError(f"{repo / name} already exists; remove it or pass another --triton-name")
    triton_repo.model_config_pb2()  # fail before any export when tritonclient is missing
    if args.trt is not None:
        import_tensorrt()
    _check_device(args.device)
    read_checkpoint_config(args.checkpoint)
    # The repository folder takes a file (the model folder's name probes it), then the other outputs.
    for output in [repo / name, *(Path(p) for p in (args.onnx, args.out) if p is not None)]:
        check_output_path(output)
    model = load_checkpoint(args.checkpoint, device=args.device)
    with tempfile.TemporaryDirectory(prefix="lanit-export-triton-") as scratch:
        if args.trt is not None:
            from lanit_export.tensorrt import export_tensorrt  # noqa: PLC0415

            engine = Path(args.out) if args.out else Path(scratch) / "model.engine"
            export_tensorrt(model, engine, args.trt, profile, onnx_path=args.onnx_path, log=print)
            written = triton_repo.write_engine_repository(repo, engine, options, name,
                                                          onnx_path=args.onnx_path)
        else:
            from lanit_export.onnx_export import export_onnx  # noqa: PLC0415

            graph = Path(args.onnx) if args.onnx else Path(scratch) / "model.onnx"
            export_onnx(model, graph, "fp16" if args.fp16 else "fp32", log=print)
            if backend == "python":
                written = triton_repo.write_python_repository(repo, graph, "onnxruntime", options, name)
            else:
                written = triton_repo.write_onnx_repository(repo, graph, options, name)
    print(f"wrote Triton model {written.folder} ({written.config.platform or written.config.backend}, "
          f"max batch {options.max_batch}, {options.instances} x {options.kind}); config validated")


def _run_openvino(args: argparse.Namespace) -> None:
    from lanit_rt import load_checkpoint  # noqa: PLC0415 (keeps --help fast)
    from lanit_rt.checkpoint import read_checkpoint_config  # noqa: PLC0415

    from lanit_export.onnx_export import check_output_path  # noqa: PLC0415
    from lanit_export.openvino_export import export_openvino, style_ir_path  # noqa: PLC0415

    args.openvino = str(Path(args.openvino).expanduser())
    _refuse_given({"--fp16": args.fp16 or None, "--onnx-path": args.onnx_path,
                   "--min-batch": args.min_batch, "--opt-batch": args.opt_batch,
                   "--max-batch": args.max_batch, "--out": args.out},
                  "only to ONNX and TensorRT exports, not to --openvino (the IR keeps fp32 weights; "
                  "pick the precision when loading it)")
    if Path(args.openvino).suffix != ".xml":
        raise UsageError(f"--openvino needs a file name ending in .xml (e.g. model.xml), got {args.openvino!r}")
    _check_device(args.device)
    read_checkpoint_config(args.checkpoint)
    for output in (Path(args.openvino), style_ir_path(args.openvino)):
        check_output_path(output)
    model = load_checkpoint(args.checkpoint, device=args.device)
    for artifact in export_openvino(model, args.openvino, log=print):
        print(f"wrote {artifact.path} and {artifact.path.with_suffix('.bin')} ({artifact.kind}, fp32 weights)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lanit-export`; returns the process exit status."""
    return run_command("lanit-export", build_parser(), _run, argv, "interrupted; no partial file was written")


if __name__ == "__main__":
    sys.exit(main())
