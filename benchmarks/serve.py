"""Load benchmark of `lanit-serve` (Triton, Python backend over onnxruntime) vs the in-process Translator.

A randomly initialised generator with the embedded default's widths (base_dim 32, max_dim 128,
style 64) at --img-size is saved as a checkpoint and exported to ONNX once; `lanit-serve` serves
that graph on loopback ports (dynamic batching up to --max-batch) and the same graph runs in-process
through Translator.from_onnx. Each request is one uint8 image at model size with its own target
(a domain text, a comma-separated pair, or random weights).

Per concurrency c (default 1, 4, 16, 64), interleaved in each of --rounds rounds so that all see the
same machine load: the in-process Translator on the same requests in batches of min(c, max_batch);
then tritonclient over HTTP and over gRPC with c client threads (one client each). Every response is
compared with the in-process translation of its own request (all of them, not a sample): "mis"
counts responses that differ by more than one uint8 level anywhere (a lost, mixed-up or wrong
image differs by far more), "±1" those that differ by exactly one level somewhere. The latter is
onnxruntime's batch-size-dependent rounding, not the server: in-process, batch 1 vs batches of 2,
4 or 5 of the same requests already differ so in about 1 request of 64. Errors are counted too. Reported: img/s (median over rounds), p50/p99 latency, errors, mismatches,
the ratio server / in-process, and the mean batch Triton's batcher formed (from its metrics).

    python benchmarks/serve.py [--img-size 64] [--concurrency 1,4,16,64] [--requests-per-client 4]
                               [--rounds 2] [--max-batch 16] [--json benchmarks/results/serve.json]

Needs lanit-rt[serve] (nvidia-pytriton, tritonclient[http,grpc]; numpy < 2: its own venv).
The client threads and the server share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lanit_rt  # noqa: E402
from lanit_rt import (Generator, LanitConfig, MappingNetwork, StyleEncoder, Translator,  # noqa: E402
                      latent_style_table, load_checkpoint, save_checkpoint)

DOMAINS = ("blond hair", "black hair", "brown hair", "red hair", "beard", "no beard")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--protocols", default="http,grpc")
    parser.add_argument("--requests-per-client", type=int, default=4,
                        help="requests per client thread per cell (at least 64 requests a cell)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency must be integers separated by commas, got {args.concurrency!r}")
    args.protocols = args.protocols.split(",")
    if any(c < 1 for c in args.concurrency) or args.rounds < 1 or args.requests_per_client < 1:
        parser.error("concurrency, rounds and requests per client must be >= 1")
    if set(args.protocols) - {"http", "grpc"}:
        parser.error(f"--protocols: http and/or grpc, got {args.protocols}")
    try:
        LanitConfig(domains=DOMAINS, img_size=args.img_size)
    except ValueError as err:  # ConfigError: before the server starts, not after
        parser.error(f"--img-size {args.img_size}: {err}")
    return args


def make_checkpoint(folder: Path, size: int) -> Path:
    torch.manual_seed(0)
    config = LanitConfig(domains=DOMAINS, img_size=size, base_dim=32, max_dim=128, style_dim=64,
                         latent_dim=16, mapping_dim=256)
    mapping = MappingNetwork(config)
    save_checkpoint(folder, config, Generator(config), mapping, StyleEncoder(config),
                    latent_table=latent_style_table(mapping, num_z=64))
    return folder


def make_requests(count: int, size: int, seed: int) -> list[tuple[np.ndarray, object]]:
    """(image uint8 [1, S, S, 3], target) with targets cycling through a text, a pair, weights."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(count):
        image = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        if i % 3 == 0:
            target: object = DOMAINS[i % len(DOMAINS)]
        elif i % 3 == 1:
            target = f"{DOMAINS[i % 4]},{DOMAINS[4 + i % 2]}"
        else:
            target = rng.random(len(DOMAINS)).astype(np.float32) + 0.01
        requests.append((image, target))
    return requests


def target_weights(translator: Translator, target: object) -> np.ndarray:
    """The raw (unnormalised) weights [1, D] the request carries: multi-hot for texts. The
    Translator normalises them once, in-process as in the server."""
    if isinstance(target, str):
        names = [t.strip() for t in target.split(",")]
        return np.array([[float(d in names) for d in translator.domains]], np.float32)
    return np.asarray(target, np.float32)[None]


def in_process(translator: Translator, requests, batch: int) -> tuple[float, list[np.ndarray]]:
    """img/s of the Translator over `requests` in batches of `batch`, and the outputs."""
    outputs: list[np.ndarray] = []
    start = time.perf_counter()
    for begin in range(0, len(requests), batch):
        chunk = requests[begin:begin + batch]
        images = np.concatenate([r[0] for r in chunk])
        weights = torch.from_numpy(np.concatenate([target_weights(translator, r[1]) for r in chunk]))
        result = translator.translate(images, weights)
        outputs.extend(result[i:i + 1] for i in range(len(chunk)))
    return len(requests) / (time.perf_counter() - start), outputs


def served(protocol: str, url: str, requests, expected, concurrency: int,
           counts: Callable[[], tuple[float, float]]) -> dict:
    """One round of `requests` from `concurrency` client threads; `counts()` reads the server's
    (inferences, executions) counters, read around the timed requests only: mean_batch."""
    from lanit_rt.triton_client import TritonTranslatorClient

    latencies: list[float] = []
    errors: list[str] = []
    mismatches = [0]
    rounding = [0]
    lock = threading.Lock()
    clients = [TritonTranslatorClient(url, protocol) for _ in range(concurrency)]
    # Before the clock: each client's metadata request for the model's domains, and one untimed
    # request (the server's first inference of a round sets its buffers up). Failures here recur
    # in the timed requests, which count them.
    try:
        for client in clients:
            client.domains  # noqa: B018
        clients[0].translate(*requests[0])
    except Exception:  # noqa: BLE001
        pass

    def worker(worker_id: int) -> None:
        client = clients[worker_id]
        for index in range(worker_id, len(requests), concurrency):
            image, target = requests[index]
            begin = time.perf_counter()
            try:
                output = client.translate(image, target)
            except Exception as err:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(str(err).splitlines()[0])
                continue
            elapsed = time.perf_counter() - begin
            with lock:
                latencies.append(elapsed)
                diff = int(np.abs(output.astype(np.int16) - expected[index].astype(np.int16)).max())
                rounding[0] += diff == 1
                mismatches[0] += diff > 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    before = counts()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = counts()
    for client in clients:
        client.close()
    latencies.sort()
    executions = after[1] - before[1]
    return {"img_s": len(latencies) / wall, "errors": len(errors), "error_examples": errors[:3],
            "mean_batch": (after[0] - before[0]) / executions if executions else None,
            "mismatches": mismatches[0], "off_by_one": rounding[0], "p50_ms": 1e3 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None}


def batcher_counts(metrics_url: str) -> tuple[float, float]:
    """(inference count, execution count) of model 'lanit' from Triton's Prometheus metrics."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        match = re.search(rf'^{name}\{{[^}}]*model="lanit"[^}}]*\}} (\S+)$', text, re.M)
        return float(match[1]) if match else float("nan")
    return value("nv_inference_count"), value("nv_inference_exec_count")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main(argv=None) -> int:
    args = parse_args(argv)
    from lanit_export.onnx_export import export_onnx

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lanit-bench-serve-") as scratch:
        scratch = Path(scratch)
        checkpoint = make_checkpoint(scratch / "run", args.img_size)
        graph = scratch / "model.onnx"
        export_onnx(load_checkpoint(checkpoint), graph, "fp32", kinds=("domain_weights",))
        translator = Translator.from_onnx(graph)
        http_port, grpc_port, metrics_port = free_ports(3)
        log = open(scratch / "server.log", "wb")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        server = subprocess.Popen(
            [sys.executable, "-m", "lanit_export.serve", str(checkpoint), "--onnx", str(graph),
             "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port",
             str(metrics_port), "--max-batch", str(args.max_batch), "--max-queue-delay-us",
             str(args.max_queue_delay_us)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while "lanit-serve: ready" not in (scratch / "server.log").read_text(errors="replace"):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("lanit-serve did not start:\n"
                                     + (scratch / "server.log").read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            urls = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            rows = []
            for concurrency in args.concurrency:
                count = max(64, concurrency * args.requests_per_client)
                requests = make_requests(count, args.img_size, seed=concurrency)
                batch = min(concurrency, args.max_batch)
                _, expected = in_process(translator, requests, batch)  # warm-up and the reference
                cell = {"concurrency": concurrency, "requests": count, "in_process_batch": batch,
                        "in_process_img_s": []}
                for protocol in args.protocols:
                    cell[protocol] = []
                for _ in range(args.rounds):
                    cell["in_process_img_s"].append(in_process(translator, requests, batch)[0])
                    for protocol in args.protocols:
                        cell[protocol].append(served(protocol, urls[protocol], requests, expected,
                                                     concurrency, lambda: batcher_counts(metrics_url)))
                rows.append(cell)
                summary = summarise(cell, args.protocols)
                print(format_row(summary, args.protocols), flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            status = server.wait(timeout=120)
            log.close()
    summaries = [summarise(cell, args.protocols) for cell in rows]
    print_table(summaries, args.protocols)
    result = {"benchmark": "serve", "img_size": args.img_size, "max_batch": args.max_batch,
              "max_queue_delay_us": args.max_queue_delay_us, "rounds": args.rounds,
              "server_exit_status": status,
              "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "numpy": np.__version__, "lanit_rt": lanit_rt.__version__,
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "summary": summaries, "cells": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


def summarise(cell: dict, protocols) -> dict:
    inproc = statistics.median(cell["in_process_img_s"])
    out = {"concurrency": cell["concurrency"], "requests": cell["requests"],
           "in_process_batch": cell["in_process_batch"], "in_process_img_s": inproc}
    def median(values):  # None where no request of the cell succeeded (its errors say why)
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    for protocol in protocols:
        runs = cell[protocol]
        img_s = statistics.median(r["img_s"] for r in runs)
        p99 = [r["p99_ms"] for r in runs if r["p99_ms"] is not None]
        out[protocol] = {"img_s": img_s, "ratio": img_s / inproc,
                         "p50_ms": median(r["p50_ms"] for r in runs),
                         "p99_ms": max(p99) if p99 else None,
                         "errors": sum(r["errors"] for r in runs),
                         "mismatches": sum(r["mismatches"] for r in runs),
                         "off_by_one": sum(r["off_by_one"] for r in runs),
                         "mean_batch": median(r["mean_batch"] or None for r in runs)}
    return out


def _num(value, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.1f}"


def format_row(s: dict, protocols) -> str:
    parts = [f"{s['concurrency']:>4} {s['requests']:>5} {s['in_process_batch']:>3} {s['in_process_img_s']:8.1f}"]
    for p in protocols:
        r = s[p]
        parts.append(f"{r['img_s']:8.1f} {r['ratio']:5.2f} {_num(r['p50_ms'], 7)} {_num(r['p99_ms'], 7)} "
                     f"{r['errors']:>3} {r['mismatches']:>3} {r['off_by_one']:>3} {_num(r['mean_batch'], 5)}")
    return " | ".join(parts)


def print_table(summaries, protocols) -> None:
    head = "conc  reqs  b  inproc/s"
    for p in protocols:
        head += f" | {p + ' img/s':>8} ratio   p50ms   p99ms err mis ±1  batch"
    print(head)
    for s in summaries:
        print(format_row(s, protocols))


if __name__ == "__main__":
    sys.exit(main())
