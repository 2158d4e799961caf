"""What the CPU benchmarks record about the machine, and how they keep engines from timing each other.

Interleaved benchmarks (edge_cpu.py, onnx_cpu.py) alternate engines call by call so that all see the
same machine load. After a call, an engine's idle worker threads keep spinning for a while:
onnxruntime's intra-op pool by default, and libgomp's under PyTorch. The next engine then shares
its cores with them, so whichever engine follows onnxruntime looks slower than it is
(benchmarks/RESULTS.md, "Edge CPUs"). These benchmarks turn spinning off: `quiet_openmp()` before
torch is imported, and ORT_NO_SPIN in every onnxruntime session they time.
"""

from __future__ import annotations

import importlib
import os
import platform
import shlex
import sys
from pathlib import Path

ORT_NO_SPIN = {"session.intra_op.allow_spinning": "0"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


def quiet_openmp() -> bool:
    """Idle OpenMP threads sleep instead of spinning. libgomp reads the setting when torch loads, so
    this takes effect only before that (a script's first lines); returns whether it did."""
    if "torch" in sys.modules:  # imported as a module (tests): too late, and harmless
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def cpu_name() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set extensions that decide fp32 / bf16 / int8 speed, as /proc/cpuinfo has them."""
    for line in _cpuinfo():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_FLAGS if flag in present]
    return []


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def versions(*modules: str) -> dict[str, str | None]:
    """Each module's __version__, None where it is not installed."""
    found: dict[str, str | None] = {}
    for name in modules:
        try:
            found[name] = str(importlib.import_module(name).__version__)
        except Exception:  # ImportError, or a broken install raising something else
            found[name] = None
    return found


def describe(script: str, argv: list[str] | None, threads: int, *modules: str) -> dict:
    """The `machine` record of a benchmark's JSON: CPU, flags, threads, load, versions, and the
    command (`script` is the file name under benchmarks/; argv None: this process's arguments)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": threads, "os_cpus": os.cpu_count(),
            "load_average_1_5_15": list(load) if load else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "ort_intra_op_spinning": ORT_NO_SPIN.get("session.intra_op.allow_spinning") != "0",
            "python": platform.python_version(), "versions": versions("torch", "numpy", *modules),
            "command": shlex.join(["python", f"benchmarks/{script}",
                                   *(sys.argv[1:] if argv is None else argv)])}
