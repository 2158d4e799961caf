"""`lanit-serve`: a Triton Inference Server for a LANIT run on this machine (KServe v2 HTTP / gRPC).

    lanit-serve RUN [--backend onnxruntime|torch] [--onnx OUT.onnx] [--address 127.0.0.1]
                [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--max-batch 16]
                [--max-queue-delay-us 2000] [--instances 1] [--threads 0] [--name lanit]
                [--repo DIR] [--max-image-side 2048]

It writes the Python-backend model repository of lanit_export.triton_repo (the format a production
Triton deployment loads too) and starts the tritonserver that nvidia-pytriton bundles (Python
backend only) on it: dynamic batching, `instances` model instances, readiness and liveness at
/v2/health/{ready,live}, Prometheus metrics at :metrics-port/metrics. SIGTERM or Ctrl-C stops it
gracefully: Triton refuses new requests and finishes those in flight, then exits 0.

--backend onnxruntime (default) serves RUN/model.onnx when it was exported from RUN's weights,
otherwise it exports (and validates) the graph into the repository first; --backend torch serves the
checkpoint itself. The repository lives in a temporary folder removed at exit unless --repo names one.

The Python backend's stub embeds libpython: it is pointed at the running interpreter's shared
library (LD_LIBRARY_PATH = its LIBDIR), so a pyenv / conda / self-built CPython works, and it imports
the packages this interpreter sees (PYTHONPATH = this sys.path). Needs `pip install 'lanit-rt[serve]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lanit_export.command import Parser, UsageError, run_command
from lanit_export.errors import ExportError, MissingDependencyError

SERVE_HINT = "pip install 'lanit-rt[serve]'"
PYTHONPATH_VARIABLE = "LANIT_SERVE_PYTHONPATH"


@dataclass(frozen=True)
class TritonInstall:
    """The pieces of PyTriton's bundled Triton that a server needs."""

    server: Path   # bin/tritonserver
    python_backend: Path  # backends/python (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path     # triton_python_backend_stub built for this Python version
    libs: Path     # the bundled shared libraries (libcudart, ...) the stub links against


def find_triton(version: tuple[int, int] | None = None) -> TritonInstall:
    """Locate the tritonserver bundled with nvidia-pytriton; MissingDependencyError when absent."""
    version = version or sys.version_info[:2]
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"lanit-serve needs nvidia-pytriton's tritonserver: {SERVE_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    bundle = root / "tritonserver"
    install = TritonInstall(bundle / "bin" / "tritonserver", bundle / "backends" / "python",
                            bundle / "python_backend_stubs" / f"{version[0]}.{version[1]}"
                            / "triton_python_backend_stub", root.parent / "nvidia_pytriton.libs")
    if not install.server.is_file() or not (install.python_backend / "libtriton_python.so").is_file():
        raise MissingDependencyError(f"nvidia-pytriton at {root} has no bundled tritonserver; {SERVE_HINT}")
    if not install.stub.is_file():
        raise MissingDependencyError(f"nvidia-pytriton has no Python-backend stub for Python "
                                     f"{version[0]}.{version[1]}")
    return install


def libpython_dir() -> Path:
    """The folder of the running interpreter's shared libpython, which the stub must load (the
    system's libpython of the same version is another build: '_thread.RLock' has no
    '_recursion_count' and similar failures)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not library.endswith(".so"):
        raise ExportError(f"this Python ({sys.executable}) was built without a shared libpython "
                          "(--enable-shared), which Triton's Python backend embeds; use a Python "
                          "built with it (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
    if not (Path(libdir) / library).exists():
        raise ExportError(f"libpython {library} is not in {libdir}")
    return Path(libdir)


def server_environment(install: TritonInstall, base: dict | None = None) -> dict:
    """Environment for tritonserver so that its Python-backend stub runs this interpreter's
    environment: this interpreter's libpython first on LD_LIBRARY_PATH, then the bundle's libraries;
    this interpreter's folder first on PATH (the stub's embedded Python finds its prefix, and so a
    venv's site-packages, from the `python3` it finds there; it ignores PYTHONPATH); and
    LANIT_SERVE_PYTHONPATH = this sys.path, which the repository's model.py adds (e.g. a source
    checkout on PYTHONPATH)."""
    env = dict(os.environ if base is None else base)
    libraries = [str(libpython_dir()), str(install.libs)]
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    interpreter = Path(sys.executable).parent
    if not (interpreter / "python3").exists():
        raise ExportError(f"no python3 beside {sys.executable}: Triton's Python-backend stub finds "
                          "its environment through it")
    env["PATH"] = os.pathsep.join([str(interpreter)] + ([env["PATH"]] if env.get("PATH") else []))
    env[PYTHONPATH_VARIABLE] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    return env


def check_stub_numpy() -> None:
    """The bundled stub is built against numpy 1.x; under numpy 2 the arrays it hands to the model
    have wrong strides (every BYTES/UINT8 input reads as its first byte repeated). Refuse it."""
    import numpy  # noqa: PLC0415

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise MissingDependencyError(
            f"numpy {numpy.__version__} is installed here, but the Python-backend stub of "
            f"nvidia-pytriton's tritonserver needs numpy < 2 (it corrupts inputs otherwise): install "
            f"lanit-serve's dependencies in their own environment: python -m venv --system-site-packages "
            f"VENV && VENV/bin/{SERVE_HINT}")


def backend_directory(install: TritonInstall, folder: Path) -> Path:
    """FOLDER/backends/python with the Python backend and this Python's stub (Triton looks for the
    stub beside libtriton_python.so)."""
    target = folder / "backends" / "python"
    target.mkdir(parents=True)
    for item in install.python_backend.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)
    shutil.copy2(install.stub, target / "triton_python_backend_stub")
    return folder / "backends"


def server_command(install: TritonInstall, repo: Path, backends: Path, address: str, http_port: int,
                   grpc_port: int, metrics_port: int, exit_timeout_s: int = 30) -> list[str]:
    return [str(install.server), f"--model-repository={repo}", f"--backend-directory={backends}",
            f"--http-address={address}", f"--http-port={http_port}",
            f"--grpc-address={address}", f"--grpc-port={grpc_port}",
            f"--metrics-address={address}", f"--metrics-port={metrics_port}",
            "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
            "--strict-readiness=true", "--disable-auto-complete-config",
            "--pinned-memory-pool-byte-size=0", f"--exit-timeout-secs={exit_timeout_s}",
            "--log-verbose=0"]


def check_ports_free(address: str, ports: Sequence[int]) -> None:
    """ExportError when another process listens on one of the ports (its health endpoint would
    otherwise answer this server's readiness check)."""
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind((address if address not in ("", "0.0.0.0") else "0.0.0.0", port))
            except OSError as err:
                raise ExportError(f"port {port} on {address or '0.0.0.0'} is in use ({err.strerror}); "
                                  "pass other --http-port / --grpc-port / --metrics-port") from None


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll GET url until 200; ExportError when the server exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ExportError(f"tritonserver exited with status {process.returncode} before it was "
                              "ready (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise ExportError(f"tritonserver was not ready after {timeout_s:.0f} s")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1..65535")
    return value


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lanit-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run folder or model.safetensors")
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"),
                        help="runtime inside the server (default onnxruntime)")
    parser.add_argument("--onnx", metavar="MODEL.onnx", help="(onnxruntime) serve this exported graph "
                        "(default: RUN/model.onnx when current, else a fresh export)")
    parser.add_argument("--address", default="127.0.0.1", help="listen address (default 127.0.0.1; "
                        "0.0.0.0 for every interface)")
    parser.add_argument("--http-port", type=_port, default=8000, help="HTTP/REST port (8000)")
    parser.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port (8001)")
    parser.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus metrics port (8002)")
    parser.add_argument("--max-batch", type=_count(1), default=16, help="largest dynamic batch (16)")
    parser.add_argument("--max-queue-delay-us", type=_count(0), default=2000,
                        help="how long the batcher waits to fill a batch (2000 us)")
    parser.add_argument("--instances", type=_count(1), default=1, help="model instances (processes; 1)")
    parser.add_argument("--threads", type=_count(0), default=0,
                        help="intra-op threads per instance (0: the runtime's default)")
    parser.add_argument("--max-image-side", type=_count(1), default=2048,
                        help="largest accepted image side in pixels (2048)")
    parser.add_argument("--name", default="lanit", help="model name in the URLs (default lanit)")
    parser.add_argument("--repo", metavar="DIR", help="write the model repository here and keep it "
                        "(default: a temporary folder)")
    parser.add_argument("--startup-timeout", type=_count(1), default=300, help="seconds (300)")
    return parser


def _serving_graph(args, scratch: Path) -> Path:
    """The ONNX graph to serve: --onnx, a current RUN/model.onnx, or a fresh validated export."""
    from lanit_rt import load_checkpoint  # noqa: PLC0415
    from lanit_export.graph_spec import config_from_metadata, read_metadata  # noqa: PLC0415
    from lanit_export.onnx_export import export_onnx  # noqa: PLC0415

    model = load_checkpoint(args.checkpoint)
    run = Path(args.checkpoint)
    candidate = Path(args.onnx) if args.onnx else (run if run.is_dir() else run.parent) / "model.onnx"
    if candidate.is_file():
        meta = read_metadata(candidate)
        current = (config_from_metadata(meta) == model.config
                   and meta.get("weights_digest") == model.weights_digest())
        if current:
            return candidate
        if args.onnx:
            raise ExportError(f"{candidate} was not exported from {args.checkpoint}'s weights")
    elif args.onnx:
        raise ExportError(f"no ONNX graph at {candidate}")
    print(f"lanit-serve: exporting the ONNX graph of {args.checkpoint} (validated) ...", flush=True)
    graph = scratch / "model.onnx"
    export_onnx(model, graph, "fp32")
    return graph


def _run(args: argparse.Namespace) -> int:
    from lanit_rt.checkpoint import read_checkpoint_config  # noqa: PLC0415
    from lanit_export.triton_repo import ServingOptions, write_python_repository  # noqa: PLC0415

    if args.onnx and args.backend != "onnxruntime":
        raise UsageError("--onnx applies to --backend onnxruntime")
    if len({args.http_port, args.grpc_port, args.metrics_port}) != 3:
        raise UsageError("--http-port, --grpc-port and --metrics-port must differ")
    args.checkpoint = str(Path(args.checkpoint).expanduser())
    check_ports_free(args.address, (args.http_port, args.grpc_port, args.metrics_port))
    install = find_triton()
    check_stub_numpy()
    env = server_environment(install)
    read_checkpoint_config(args.checkpoint)
    options = ServingOptions(max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                             instances=args.instances)
    with tempfile.TemporaryDirectory(prefix="lanit-serve-") as scratch:
        scratch = Path(scratch)
        repo = Path(args.repo).expanduser() if args.repo else scratch / "repository"
        artifact = (_serving_graph(args, scratch) if args.backend == "onnxruntime"
                    else Path(args.checkpoint))
        model = write_python_repository(repo, artifact, args.backend, options, name=args.name,
                                        threads=args.threads, max_image_side=args.max_image_side)
        backends = backend_directory(install, scratch / "triton")
        command = server_command(install, repo, backends, args.address, args.http_port, args.grpc_port,
                                 args.metrics_port)
        return _serve(command, env, args, model.folder)


def _serve(command: list[str], env: dict, args: argparse.Namespace, model_folder: Path) -> int:
    """Start tritonserver, report readiness, forward SIGTERM/SIGINT, return its exit status."""
    # Its own session: a terminal's Ctrl-C reaches only lanit-serve, which stops the server once.
    process = subprocess.Popen(command, env=env, start_new_session=True)
    stopping = []

    def stop(signum, _frame) -> None:
        if not stopping:
            stopping.append(signum)
            print(f"lanit-serve: {signal.Signals(signum).name}: finishing in-flight requests ...",
                  file=sys.stderr, flush=True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        host = "127.0.0.1" if args.address in ("0.0.0.0", "") else args.address
        try:
            wait_ready(f"http://{host}:{args.http_port}/v2/health/ready", process, args.startup_timeout)
        except ExportError:
            if stopping:
                return _reap(process)
            raise
        print(f"lanit-serve: ready: model '{args.name}' ({model_folder}) at http://{host}:{args.http_port} "
              f"(gRPC {host}:{args.grpc_port}, metrics http://{host}:{args.metrics_port}/metrics)",
              flush=True)
        return _reap(process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reap(process: subprocess.Popen) -> int:
    status = process.wait()
    return 0 if status in (0, -signal.SIGTERM) else (status if status > 0 else 128 - status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lanit-serve`; returns the process exit status."""
    return run_command("lanit-serve", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
