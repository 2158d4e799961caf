"""Triton serving: the model-repository writer, the Python-backend model's request handling, and
`lanit-serve` as a real tritonserver queried over HTTP and gRPC on loopback ports.

Layers, each skipped cleanly where its dependencies are missing:
- request parsing and batching of lanit_rt.triton_model: no extra dependency;
- repository writer and `lanit-export --triton-repo`: onnx + tritonclient (its ModelConfig protobuf);
- the server: nvidia-pytriton + tritonclient[http,grpc] with numpy < 2 (`lanit-rt[serve]`, which CI
  installs in its own venv: .ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from lanit_rt import (Generator, LanitConfig, MappingNetwork, StyleEncoder, Translator,
                      latent_style_table, save_checkpoint)
from lanit_rt.triton_model import parse_domains, parse_request, translate_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LanitConfig(domains=("blond hair", "black hair", "beard"), img_size=32, base_dim=8, max_dim=32,
                     style_dim=16, latent_dim=8, mapping_dim=32)
DOMAINS = CONFIG.domains


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(2024)
    folder = tmp_path_factory.mktemp("serve_ckpt")
    mapping = MappingNetwork(CONFIG)
    save_checkpoint(folder, CONFIG, Generator(CONFIG), mapping, StyleEncoder(CONFIG),
                    latent_table=latent_style_table(mapping, num_z=16))
    return folder


def _images(n: int, height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- request handling
def test_parse_domains_multi_hot_and_errors():
    rows = np.array([[b"beard"], [b" blond hair , beard "]], dtype=object)
    np.testing.assert_array_equal(parse_domains(rows, DOMAINS), [[0, 0, 1], [1, 0, 1]])
    for bad, message in (([[b"purple"]], "unknown domain 'purple'"), ([[b""]], "comma-separated"),
                         ([[b"beard,"]], "comma-separated"), ([[b"beard,beard"]], "twice"),
                         ([[b"\xff"]], "UTF-8")):
        with pytest.raises(ValueError, match=message):
            parse_domains(np.array(bad, dtype=object), DOMAINS)


@pytest.mark.parametrize("change, message", [
    (dict(image=_images(1)[:0]), "empty batch"),
    (dict(image=_images(1, 3000, 20)), "larger than this server's limit of 2048"),
    (dict(image=_images(1).astype(np.float32)), "must be uint8"),
    (dict(image=_images(1)[..., :2]), "must be uint8 \\[N, H, W, 3\\]"),
    (dict(image=None), "missing input 'image'"),
    (dict(weights=np.array([[np.nan, 1, 0]], np.float32)), "NaN"),
    (dict(weights=np.array([[-1, 1, 0]], np.float32)), ">= 0"),
    (dict(weights=np.zeros((1, 3), np.float32)), "positive sum"),
    (dict(weights=np.ones((1, 2), np.float32)), "must be \\[N, 3\\]"),
    (dict(domains=np.array([[b"beard"]], dtype=object)), "exactly one of"),  # both targets
    (dict(weights=None), "exactly one of"),  # neither
    (dict(weights=np.ones((2, 3), np.float32)), "2 targets for 1 images"),
])
def test_parse_request_refuses_bad_requests(change, message):
    request = dict(image=_images(1), domains=None, weights=np.ones((1, 3), np.float32))
    request.update(change)
    with pytest.raises(ValueError, match=message):
        parse_request(request["image"], request["domains"], request["weights"], DOMAINS)


def test_translate_groups_batches_by_size_and_matches_per_request(checkpoint):
    translator = Translator.from_checkpoint(checkpoint)
    requests = [(_images(2, seed=1), np.array([[1, 0, 0], [0, 1, 1]], np.float32)),
                None,  # a refused request keeps its slot
                (_images(1, 24, 24, seed=2), np.array([[0, 0, 1]], np.float32)),
                (_images(3, seed=3), np.array([[1, 1, 1]] * 3, np.float32))]
    calls = []
    real = translator.translate

    def counting(images, weights):
        calls.append(len(images))
        return real(images, weights)

    translator.translate = counting
    results = translate_groups(translator, requests)
    assert sorted(calls) == [1, 5]  # the two 40x48 requests ran as one batch of 5
    assert results[1] is None
    for request, result in zip(requests, results):
        if request is not None:
            expected = real(request[0], torch.from_numpy(request[1]))
            assert result.shape == (len(request[0]), 32, 32, 3) and result.dtype == np.uint8
            np.testing.assert_array_equal(result, expected)


# ----------------------------------------------------------------------------- repository writer
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_writer = pytest.mark.skipif(not (_has("onnx") and _has("onnxruntime") and _has("tritonclient")),
                                  reason="needs onnx, onnxruntime and tritonclient (lanit-rt[dev] or [serve])")


@pytest.fixture(scope="module")
def onnx_repo(checkpoint, tmp_path_factory) -> Path:
    """`lanit-export CKPT --triton-repo REPO --max-batch 8` (one ONNX export for the whole module)."""
    from lanit_export.cli import main

    repo = tmp_path_factory.mktemp("triton") / "repo"
    assert main([str(checkpoint), "--triton-repo", str(repo), "--max-batch", "8", "--instances", "2"]) == 0
    return repo


@needs_writer
@pytest.mark.slow
def test_onnx_repository_config_matches_graph(onnx_repo):
    import onnx

    from lanit_export.triton_repo import model_config_pb2, parse_config

    pb2 = model_config_pb2()
    folder = onnx_repo / "lanit"
    config = parse_config((folder / "config.pbtxt").read_text())
    graph = onnx.load(str(folder / "1" / "model.onnx"))
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert [i.name for i in config.input] == [i.name for i in graph.graph.input] == ["image", "domain_weights"]
    assert [o.name for o in config.output] == [o.name for o in graph.graph.output] == ["translated"]
    assert [list(i.dims) for i in config.input] == [[3, 32, 32], [3]]
    assert [pb2.DataType.Name(i.data_type) for i in config.input] == ["TYPE_FP32", "TYPE_FP32"]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert json.loads(config.parameters["domains"].string_value) == list(DOMAINS)
    assert (folder / "domains.txt").read_text().splitlines() == list(DOMAINS)
    (warmup,) = config.model_warmup
    assert warmup.inputs["domain_weights"].input_data_file == "domain_weights"
    np.testing.assert_array_equal(np.fromfile(folder / "warmup" / "domain_weights", "<f4"), [1, 1, 1])
    assert not [p for p in onnx_repo.iterdir() if p.name.startswith(".")]  # no staging left behind


@needs_writer
@pytest.mark.slow
def test_config_checks_reject_what_does_not_fit(onnx_repo):
    from lanit_export import ExportError
    from lanit_export.triton_repo import (ServingOptions, artifact_specs, check_config, config_text,
                                          parse_config)

    text = (onnx_repo / "lanit" / "config.pbtxt").read_text()
    inputs, outputs = artifact_specs(CONFIG)
    options = ServingOptions(max_batch=8, instances=2)
    check_config(parse_config(text), "lanit", inputs, outputs, options, CONFIG)
    for broken, message in ((text.replace("dims: [ 3, 32, 32 ]", "dims: [ 3, 64, 64 ]", 1), "dims"),
                            (text.replace("TYPE_FP32", "TYPE_FP16", 1), "TYPE_FP16"),
                            (text.replace('"domain_weights" data_type', '"weights" data_type'), "names"),
                            (text.replace("max_batch_size: 8", "max_batch_size: 4"), "max_batch_size"),
                            (text.replace("count: 2", "count: 1"), "instance_group")):
        with pytest.raises(ExportError, match=message):
            check_config(parse_config(broken), "lanit", inputs, outputs, options, CONFIG)
    with pytest.raises(ExportError, match="invalid Triton model config"):
        parse_config(text.replace("max_batch_size", "max_batch"))  # misspelled field
    with pytest.raises(ExportError, match="invalid Triton model config"):
        parse_config(text.replace("KIND_CPU", "KIND_TPU"))  # bad enum
    # the writer's own text for another model does not pass as this one
    other = config_text("lanit", CONFIG, inputs, outputs, ServingOptions(max_batch=16), platform="x")
    with pytest.raises(ExportError, match="max_batch_size 16 != 8"):
        check_config(parse_config(other), "lanit", inputs, outputs, options, CONFIG)


@needs_writer
@pytest.mark.slow
def test_engine_repository_around_a_placeholder(onnx_repo, tmp_path):
    from lanit_export import ExportError
    from lanit_export.tensorrt import batch_profile, engine_sidecar, write_sidecar
    from lanit_export.triton_repo import ServingOptions, parse_config, write_engine_repository

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"placeholder: not a TensorRT engine")
    write_sidecar(engine, engine_sidecar(CONFIG, "fp16", batch_profile(1, 8, 32)))
    graph = onnx_repo / "lanit" / "1" / "model.onnx"
    written = write_engine_repository(tmp_path / "repo", engine, onnx_path=graph)
    config = parse_config(written.config_path.read_text())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert config.max_batch_size == 32 and config.instance_group[0].kind == 1  # KIND_GPU
    assert config.parameters["profile"].string_value == "1,8,32"
    assert [list(i.dims) for i in config.input] == [[3, 32, 32], [3]]
    assert (written.folder / "1" / "model.plan").read_bytes() == engine.read_bytes()
    with pytest.raises(ExportError, match="exceeds the engine's profile"):
        write_engine_repository(tmp_path / "repo2", engine, ServingOptions(max_batch=64, kind="KIND_GPU"))
    with pytest.raises(ExportError, match="already exists"):
        write_engine_repository(tmp_path / "repo", engine)
    write_sidecar(engine, engine_sidecar(CONFIG, "fp16", batch_profile(2, 8, 32)))
    with pytest.raises(ExportError, match=r"profile starts at batch 2; Triton sends batches from 1 up, "
                       r"so a served engine needs --min-batch 1"):
        write_engine_repository(tmp_path / "repo4", engine)
    write_sidecar(engine, engine_sidecar(CONFIG, "fp16", batch_profile(1, 8, 32)))
    other = LanitConfig(domains=("a", "b"), img_size=32, base_dim=8, max_dim=32, style_dim=16)
    write_sidecar(engine, engine_sidecar(other, "fp16", batch_profile(1, 8, 32)))
    with pytest.raises(ExportError, match="not the lanit-export interface"):
        write_engine_repository(tmp_path / "repo3", engine, onnx_path=graph)


@needs_writer
def test_python_repository_for_the_torch_runtime(checkpoint, tmp_path):
    from lanit_export import ExportError
    from lanit_export.triton_repo import ServingOptions, parse_config, write_python_repository

    written = write_python_repository(tmp_path / "repo", checkpoint, "torch",
                                      ServingOptions(max_batch=4, max_queue_delay_us=500), name="faces")
    config = parse_config(written.config_path.read_text())
    assert config.backend == "python" and config.name == "faces" and config.max_batch_size == 4
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        ("image", [-1, -1, 3], False), ("domains", [1], True), ("domain_weights", [3], True)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("translated", [32, 32, 3])]
    assert config.parameters["runtime"].string_value == "torch"
    assert "from lanit_rt.triton_model import TritonPythonModel" in (written.folder / "1" / "model.py").read_text()
    assert (written.folder / "1" / "model.safetensors").is_file()
    for bad, message in ((dict(runtime="openvino"), "unknown Python-backend runtime"),
                         (dict(name="-x"), "model name"),
                         (dict(options=ServingOptions(max_batch=4), threads=-1), "threads")):
        args = dict(runtime="torch", options=ServingOptions(), name="other") | bad
        with pytest.raises(ExportError, match=message):
            write_python_repository(tmp_path / "repo", checkpoint, **args)
    with pytest.raises(ExportError, match="max batch must be an integer >= 1"):
        ServingOptions(max_batch=0)


def test_export_cli_triton_usage_errors(checkpoint, tmp_path, capsys, monkeypatch):
    from lanit_export.cli import main

    assert main([str(checkpoint), "--triton-repo", str(tmp_path), "--triton-backend", "tensorrt"]) == 2
    assert "--triton-backend tensorrt needs --trt" in capsys.readouterr().err
    assert main([str(checkpoint), "--triton-repo", str(tmp_path), "--min-batch", "2"]) == 2
    assert "--min-batch applies only with --trt" in capsys.readouterr().err
    assert main([str(checkpoint), "--triton-repo", str(tmp_path), "--trt", "fp16", "--min-batch", "2"]) == 2
    assert "the engine's profile starts at batch 2; Triton sends batches from 1 up" in capsys.readouterr().err
    (tmp_path / "lanit").mkdir()
    assert main([str(checkpoint), "--triton-repo", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(checkpoint)]) == 2
    assert "is required (or --triton-repo DIR)" in capsys.readouterr().err
    # Flags of one target given to another are refused, not dropped; 0 is not "the default".
    onnx, ir = str(tmp_path / "m.onnx"), str(tmp_path / "m.xml")
    for argv, message in (
            (["--onnx", onnx, "--triton-backend", "python", "--instances", "4"],
             "--triton-backend, --instances apply only with --triton-repo DIR"),
            (["--openvino", ir, "--triton-name", "x", "--max-queue-delay-us", "0"],
             "--triton-name, --max-queue-delay-us apply only with --triton-repo DIR"),
            (["--triton-repo", str(tmp_path / "r"), "--openvino", ir],
             "--openvino and --triton-repo exclude each other"),
            (["--triton-repo", str(tmp_path / "r"), "--max-batch", "0"], "max batch must be an integer >= 1, got 0"),
            (["--triton-repo", str(tmp_path / "r"), "--instances", "0"], "instances must be an integer >= 1, got 0")):
        assert main([str(checkpoint), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not [p for p in tmp_path.iterdir() if p.name != "lanit"]  # nothing written
    # A repository path that cannot take files is refused before the export, not after it.
    import lanit_export.onnx_export as onnx_export

    def no_export(*args, **kwargs):
        raise AssertionError("the repository path must be checked before the export")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    (tmp_path / "afile").write_text("a regular file")
    assert main([str(checkpoint), "--triton-repo", str(tmp_path / "afile")]) == 1
    assert "cannot create folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lanit-serve
def _serve_skip_reason() -> str | None:
    try:
        from lanit_export.serve import check_stub_numpy, find_triton

        find_triton()
        check_stub_numpy()
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"lanit-serve needs lanit-rt[serve] in its own venv: {str(err).splitlines()[0]}"
    return None


SERVE_SKIP = _serve_skip_reason()
needs_server = pytest.mark.skipif(SERVE_SKIP is not None, reason=SERVE_SKIP or "")
MAX_SIDE = 256


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def server(checkpoint, onnx_repo, tmp_path_factory):
    """lanit-serve on the module's ONNX graph (onnxruntime in the Python backend), loopback ports."""
    http_port, grpc_port, metrics_port = _free_ports(3)
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "lanit_export.serve", str(checkpoint), "--backend", "onnxruntime",
               "--onnx", str(onnx_repo / "lanit" / "1" / "model.onnx"), "--address", "127.0.0.1",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port),
               "--metrics-port", str(metrics_port), "--max-batch", "8", "--max-queue-delay-us", "5000",
               "--threads", "1", "--max-image-side", str(MAX_SIDE), "--startup-timeout", "240"]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while "lanit-serve: ready" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"lanit-serve did not become ready:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    info = dict(process=process, log=log, http=f"127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}",
                metrics=f"http://127.0.0.1:{metrics_port}/metrics", graph=onnx_repo / "lanit" / "1" / "model.onnx")
    yield info
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def reference(server):
    return Translator.from_onnx(server["graph"], threads=1)  # as the server's instance


@needs_writer
@needs_server
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_translations_equal_the_translator(server, reference, protocol):
    from lanit_rt.triton_client import TritonTranslatorClient

    with TritonTranslatorClient(server[protocol], protocol) as client:
        assert client.ready() and client.domains == DOMAINS
        with pytest.raises(ValueError, match="unknown domain 'purple'"):
            client.translate(_images(1)[0], "purple,beard")
        images = _images(3, seed=7)
        got = client.translate(images, ["beard", "blond hair,beard", "black hair"])
        expected = reference.translate(images, torch.tensor([[0, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=torch.float32))
        np.testing.assert_array_equal(got, expected)
        weights = np.array([0.2, 0.0, 0.8], np.float32)
        single = _images(1, 24, 30, seed=8)[0]
        np.testing.assert_array_equal(client.translate(single, weights), reference.translate(single, weights))


@needs_writer
@needs_server
@pytest.mark.slow
def test_bad_requests_get_errors_and_the_server_keeps_serving(server, reference):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def infer(module, url, tensors):
        inputs = []
        for name, array, datatype in tensors:
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        # Closed here, in the thread that made it: a client left to the garbage collector may be
        # collected in another test's worker thread, where gevent's hub is missing.
        client = module.InferenceServerClient(url)
        try:
            return client.infer("lanit", inputs).as_numpy("translated")
        finally:
            client.close()

    image = _images(1)
    domains = np.array([[b"beard"]], dtype=object)
    cases = [
        ([("image", image, "UINT8"), ("domains", np.array([[b"purple"]], dtype=object), "BYTES")],
         "unknown domain 'purple'"),
        ([("image", image.astype(np.float32), "FP32"), ("domains", domains, "BYTES")], "expects 'UINT8'"),
        ([("image", image[..., :2].copy(), "UINT8"), ("domains", domains, "BYTES")], "unexpected shape"),
        ([("image", image[:0], "UINT8"), ("domains", domains[:0], "BYTES")], "empty batch|got 0"),
        ([("image", image[:0], "UINT8"), ("domain_weights", np.ones((0, 3), np.float32), "FP32")],
         "empty batch|got 0"),
        ([("image", image, "UINT8"), ("domain_weights", np.array([[np.nan, 1, 0]], np.float32), "FP32")],
         "NaN"),
        ([("image", _images(1, MAX_SIDE + 1, 8), "UINT8"), ("domains", domains, "BYTES")],
         f"limit of {MAX_SIDE} pixels"),
        ([("image", image, "UINT8")], "exactly one of"),
    ]
    for module, url in ((httpclient, server["http"]), (grpcclient, server["grpc"])):
        for tensors, message in cases:
            with pytest.raises(InferenceServerException, match=message) as caught:
                infer(module, url, tensors)
            assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), message
        got = infer(module, url, [("image", image, "UINT8"), ("domains", domains, "BYTES")])
        np.testing.assert_array_equal(got, reference.translate(image, "beard"))
    assert server["process"].poll() is None


@needs_writer
@needs_server
@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_translation(server, reference):
    from lanit_rt.triton_client import TritonTranslatorClient

    jobs = [(_images(1, seed=100 + i), DOMAINS[i % 3]) for i in range(24)]
    results: dict[int, np.ndarray] = {}

    def worker(worker_id: int) -> None:
        with TritonTranslatorClient(server["http"]) as client:
            for index in range(worker_id, len(jobs), 8):
                results[index] = client.translate(*jobs[index])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == list(range(len(jobs)))
    # Triton's batcher composes batches freely and onnxruntime's rounding depends on the batch size
    # (one uint8 level at most); a lost or mixed-up response would differ by far more.
    for index, (images, domain) in enumerate(jobs):
        difference = np.abs(results[index].astype(int) - reference.translate(images, domain).astype(int))
        assert difference.max() <= 1, index
    with urllib.request.urlopen(server["metrics"], timeout=10) as response:
        metrics = response.read().decode()
    success = [line for line in metrics.splitlines()
               if line.startswith("nv_inference_request_success") and 'model="lanit"' in line]
    assert success and float(success[0].rsplit(" ", 1)[1]) >= len(jobs)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/lanit/ready"):
        with urllib.request.urlopen(f"http://{server['http']}{path}", timeout=10) as response:
            assert response.status == 200


@needs_writer
@needs_server
@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(server, reference):
    """Runs last in this module: it stops the shared server."""
    from lanit_rt.triton_client import TritonTranslatorClient

    images = _images(8, seed=9)
    outcome = {}

    def request() -> None:
        with TritonTranslatorClient(server["http"], network_timeout=120.0) as client:
            outcome["result"] = client.translate(images, "blond hair")

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.05)
    server["process"].send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    assert server["process"].wait(timeout=90) == 0
    if "result" in outcome:  # the request reached the server before it stopped accepting
        np.testing.assert_array_equal(outcome["result"], reference.translate(images, "blond hair"))
    log = server["log"].read_text(errors="replace")
    assert "finishing in-flight requests" in log and "successfully unloaded 'lanit'" in log


def test_serve_cli_reports_missing_pieces(checkpoint, capsys, monkeypatch):
    from lanit_export import serve

    assert serve.main([str(checkpoint), "--http-port", "9000", "--grpc-port", "9000"]) == 2
    assert "must differ" in capsys.readouterr().err
    ports = [str(p) for p in _free_ports(3)]
    flags = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(ports[1])))
        taken.listen()
        assert serve.main([str(checkpoint), *flags]) == 1
        assert f"port {ports[1]} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert serve.main([str(checkpoint), "--backend", "torch", "--onnx", "x.onnx"]) == 2
    assert "--onnx applies to --backend onnxruntime" in capsys.readouterr().err
    monkeypatch.setattr(np, "__version__", "2.4.0")
    with pytest.raises(Exception, match="needs numpy < 2"):
        serve.check_stub_numpy()
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert serve.main([str(checkpoint), *flags]) == 1
    assert "pip install 'lanit-rt[serve]'" in capsys.readouterr().err
