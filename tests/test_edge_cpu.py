"""CPU edge paths: the Translator's host fast path, onnxruntime session options, export=True, and
the OpenVINO backend (skipped cleanly where openvino is not installed), each against the torch
backend within its precision's tolerance."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from lanit_rt import (Generator, LanitConfig, MappingNetwork, StyleEncoder, Translator, latent_style_table,
                      load_checkpoint, save_checkpoint)
from lanit_rt.backends.base import ArtifactError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIG = LanitConfig(domains=("blond hair", "black hair", "beard"), img_size=32, base_dim=8,
                     max_dim=32, style_dim=16, latent_dim=8, mapping_dim=32)
SIZE = CONFIG.img_size
# Output tolerances against torch fp32 on [-1, 1] images: fp32 engines agree to rounding; bf16
# keeps 8 mantissa bits through ~10 layers.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save(folder, seed: int):
    torch.manual_seed(seed)
    generator, mapping, encoder = Generator(CONFIG), MappingNetwork(CONFIG), StyleEncoder(CONFIG)
    with torch.no_grad():  # an untrained model barely reacts to its style (see test_translator)
        mapping.head_weights[-1].mul_(15)
        generator.style_to_adain.weight.mul_(2)
        generator.to_rgb[-1].weight.mul_(0.3)
    save_checkpoint(folder, CONFIG, generator, mapping, encoder,
                    latent_table=latent_style_table(mapping, num_z=64, seed=0))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = _save(tmp_path_factory.mktemp("edge"), 7)
    # export=True writes the missing artifact (validated) instead of stopping.
    with pytest.raises(ArtifactError, match="export=True"):
        Translator.from_checkpoint(folder, backend="onnxruntime")
    Translator.from_checkpoint(folder, backend="onnxruntime", export=True, threads=1)
    assert (folder / "model.onnx").exists() and (folder / "model.style.onnx").exists()
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint):
    return Translator.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def ort(checkpoint):
    return Translator.from_checkpoint(checkpoint, backend="onnxruntime", threads=1)


def _uint8(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def _levels(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def test_host_fast_path_matches_torch_and_skips_the_general_path(ort, reference, monkeypatch, tmp_path):
    stack = _uint8(3)
    expected = reference.translate(stack, ["blond hair", "beard"])
    import lanit_rt.translator as translator_module

    def refuse(*args, **kwargs):
        raise AssertionError("the general image path ran")

    monkeypatch.setattr(translator_module, "load_images", refuse)
    got = ort.translate(stack, ["blond hair", "beard"])
    assert got.shape == (3, SIZE, SIZE, 3) and got.dtype == np.uint8
    assert _levels(got, expected) <= 1
    single = ort.translate(stack[1], "black hair")
    assert single.shape == (SIZE, SIZE, 3)
    pil = ort.translate(Image.fromarray(stack[1]), "black hair")
    assert isinstance(pil, Image.Image) and pil.mode == "RGB" and pil.size == (SIZE, SIZE)
    monkeypatch.undo()
    # A model-size RGB file closed before it was read is left to the general path's clear error.
    Image.fromarray(stack[1]).save(tmp_path / "closed.png")
    with Image.open(tmp_path / "closed.png") as closed:
        pass
    with pytest.raises(ValueError, match="image 0: this PIL image's file was closed before"):
        ort.translate(closed, "black hair")
    # So is one with a transparent colour key, which must come out white as training reads it.
    keyed = Image.fromarray(stack[1])
    keyed.info["transparency"] = tuple(int(v) for v in stack[1][0, 0])
    white = stack[1].copy()
    white[(stack[1] == stack[1][0, 0]).all(axis=2)] = 255
    assert _levels(np.asarray(ort.translate(keyed, "black hair")), ort.translate(white, "black hair")) == 0
    assert _levels(single, reference.translate(stack[1], "black hair")) <= 1
    assert _levels(np.asarray(pil), single) == 0
    # Results are the caller's: a later call does not overwrite them.
    before = got.copy()
    ort.translate(_uint8(3, seed=5), "blond hair")
    assert np.array_equal(got, before)
    # A cached target still checks its names; other specs and other sizes take the general path.
    with pytest.raises(KeyError, match="smiling"):
        ort.translate(stack, "smiling")
    weights = {"blond hair": 3.0, "beard": 1.0}
    assert _levels(ort.translate(stack, weights), reference.translate(stack, weights)) <= 1
    big = np.repeat(np.repeat(stack, 2, axis=1), 2, axis=2)
    assert _levels(ort.translate(big, "beard"), reference.translate(big, "beard")) <= 1


class _IdentityBackend:
    """A host backend whose 'generator' returns its input image, on both paths."""

    name = "identity"
    device = torch.device("cpu")
    config = CONFIG
    supports_weights, supports_style = True, False

    def __init__(self):
        self.weights_seen = []

    def run_weights(self, images, weights):
        return images.clone()

    def host_slot(self, n):
        from lanit_rt.backends.base import HostSlot
        image = np.empty((n, 3, SIZE, SIZE), np.float32)
        weights = np.empty((n, CONFIG.num_domains), np.float32)
        output = np.empty_like(image)

        def run():
            self.weights_seen.append(weights.copy())
            output[...] = image * 1.01  # slightly out of range: the output must be clamped

        return HostSlot(image, weights, output, run)


def test_host_fast_path_conversions_are_exact():
    backend = _IdentityBackend()
    translator = Translator(backend)
    stack = _uint8(2, seed=3)
    stack[0, 0, 0] = (0, 255, 128)
    got = translator.translate(stack, {"beard": 1.0, "blond hair": 3.0})
    expected = np.clip(np.rint((np.clip(stack / 127.5 - 1, -1, 1) * 1.01).clip(-1, 1) * 127.5 + 127.5),
                       0, 255)
    assert np.array_equal(got, expected.astype(np.uint8))
    np.testing.assert_allclose(backend.weights_seen[-1], [[0.75, 0, 0.25]] * 2, atol=1e-7)
    translator.translate(stack, ["black hair", "beard"])
    translator.translate(stack, ["black hair", "beard"])  # a cached row
    np.testing.assert_allclose(backend.weights_seen[-1], [[0, 0.5, 0.5]] * 2, atol=1e-7)
    # The same image through the general path (a tensor input) gives the same pixels.
    general = translator.translate(torch.from_numpy(stack).permute(0, 3, 1, 2) / 127.5 - 1, "beard")
    assert np.array_equal(((general + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy(),
                          stack)


def test_host_slot_writes_the_bound_output(ort, checkpoint):
    slot = ort.backend.host_slot(2)
    for seed, weights in ((0, [[1.0, 0, 0], [0, 0.5, 0.5]]), (1, [[0, 0, 1.0], [0, 1.0, 0]])):
        # The buffers are bound once: new contents of the same arrays must reach the graph.
        images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        weights = torch.tensor(weights)
        slot.image[...] = images.numpy()
        slot.weights[...] = weights.numpy()
        slot.output.fill(np.nan)
        slot.run()
        expected = ort.backend.run_weights(images, weights).numpy()
        assert np.isfinite(slot.output).all()
        np.testing.assert_allclose(slot.output, expected, atol=1e-6)


def test_concurrent_fast_calls_match_serial(ort):
    inputs = [_uint8(1 + i % 2, seed=i) for i in range(6)]
    serial = [ort.translate(x, "beard") for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            results[i] = ort.translate(inputs[i], "beard")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        assert np.array_equal(got, want)


def test_onnxruntime_session_options(checkpoint, reference):
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    expected = reference.translate(images, "beard")
    for optimization in ("basic", "disabled"):
        t = Translator.from_checkpoint(checkpoint, backend="onnxruntime", optimization=optimization,
                                       spin_wait=False, threads=1)
        assert t.describe()["optimization"] == optimization and t.describe()["spin_wait"] is False
        assert (t.translate(images, "beard") - expected).abs().max() <= TOLERANCE["fp32"]
    with pytest.raises(ValueError, match="unknown optimization 'fast'"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", optimization="fast")
    with pytest.raises(ValueError, match="threads must be a non-negative int"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", threads=-1)
    with pytest.raises(ValueError, match="apply to backend='onnxruntime' only"):
        Translator.from_checkpoint(checkpoint, spin_wait=True)
    with pytest.raises(ValueError, match="apply to backend='openvino' only"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="export=True writes an exported file"):
        Translator.from_checkpoint(checkpoint, export=True)


# --------------------------------------------------------------------------- openvino


def test_precision_resolution_follows_the_cpu():
    from lanit_rt.backends.openvino import resolve_precision
    with_bf16 = ("FP32", "INT8", "BF16")
    without = ("FP32", "INT8", "BIN")
    assert resolve_precision("auto", with_bf16) == "bf16"
    assert resolve_precision("auto", without) == "fp32"
    assert resolve_precision("bf16", with_bf16) == "bf16"
    with pytest.raises(ValueError, match="this CPU has no bf16 arithmetic .*FP32, INT8, BIN"):
        resolve_precision("bf16", without)
    with pytest.raises(ValueError, match="this CPU has no fp16 arithmetic"):
        resolve_precision("fp16", with_bf16)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        resolve_precision("int4", with_bf16)


@pytest.fixture(scope="module")
def openvino_ir(checkpoint):
    pytest.importorskip("openvino")
    from lanit_export.cli import main
    assert main([str(checkpoint), "--openvino", str(checkpoint / "model.xml")]) == 0
    return checkpoint / "model.xml"


@pytest.mark.parametrize("artifact", ["model.onnx", "model.xml"])
def test_openvino_matches_torch_backend(checkpoint, openvino_ir, reference, artifact):
    translator = Translator.from_checkpoint(checkpoint, backend="openvino", precision="fp32", threads=1,
                                            artifact=checkpoint / artifact)
    assert translator.backend.supports_style and translator.describe()["precision"] == "fp32"
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    for spec in ("beard", ["blond hair", "black hair"]):
        diff = (translator.translate(images, spec) - reference.translate(images, spec)).abs().max()
        assert diff <= TOLERANCE["fp32"]
    style = torch.randn(3, CONFIG.style_dim)
    diff = (translator.translate(images, style=style) - reference.translate(images, style=style)).abs().max()
    assert diff <= TOLERANCE["fp32"]
    stack = _uint8(2)
    assert _levels(translator.translate(stack, "beard"), reference.translate(stack, "beard")) <= 1
    # Compiled once per batch size and reused.
    graph = translator.backend.graphs["domain_weights"]
    assert graph.compiled(3) is graph.compiled(3)


def test_openvino_keeps_a_bounded_set_of_compiled_batch_sizes(checkpoint, openvino_ir, monkeypatch):
    """Each batch size compiles a model; at most _MAX_COMPILED stay (2 here, 8 in use), and this
    thread's infer requests (each holds its model) are dropped with them, so a server fed every
    batch size does not keep every model it ever compiled."""
    import gc
    import weakref

    from lanit_rt.backends import openvino

    monkeypatch.setattr(openvino, "_MAX_COMPILED", 2)
    translator = Translator.from_checkpoint(checkpoint, backend="openvino", precision="fp32", threads=1,
                                            artifact=openvino_ir)
    graph = translator.backend.graphs["domain_weights"]
    translator.translate(torch.zeros(1, 3, SIZE, SIZE), "beard")
    first = weakref.ref(graph._request(1))
    for n in (2, 3, 4):
        out = translator.translate(torch.zeros(n, 3, SIZE, SIZE), "beard")
        assert out.shape == (n, 3, SIZE, SIZE)
    assert list(graph._compiled) == list(graph._local.requests) == [3, 4]
    gc.collect()
    assert first() is None  # batch 1's request and model are gone
    again = translator.translate(torch.zeros(1, 3, SIZE, SIZE), "beard")  # and come back on demand
    torch.testing.assert_close(again, translator.translate(torch.zeros(1, 3, SIZE, SIZE), "beard"))


def test_openvino_default_artifact_and_refusals(checkpoint, openvino_ir, tmp_path):
    from lanit_export.cli import main
    translator = Translator.from_checkpoint(checkpoint, backend="openvino")
    assert translator.describe()["artifact"] == "model.xml"  # the IR beside the checkpoint wins
    standalone = Translator.from_openvino(openvino_ir, precision="fp32", domains=CONFIG.domains)
    assert standalone.domains == CONFIG.domains
    with pytest.raises(ArtifactError, match="exported for domains"):
        Translator.from_openvino(openvino_ir, domains=["smiling"])
    with pytest.raises(ValueError, match="unknown performance_hint 'fastest'"):
        Translator.from_checkpoint(checkpoint, backend="openvino", performance_hint="fastest")
    with pytest.raises(ValueError, match="runs on the CPU"):
        Translator.from_checkpoint(checkpoint, backend="openvino", device="cuda")
    # An IR of other weights is refused, like an ONNX export of other weights.
    from lanit_export.openvino_export import export_openvino
    retrained = load_checkpoint(_save(tmp_path / "retrained", 8))
    export_openvino(retrained, tmp_path / "model.xml", validate=False, kinds=("domain_weights",))
    with pytest.raises(ArtifactError, match="exported from other weights"):
        Translator.from_checkpoint(checkpoint, backend="openvino", artifact=tmp_path / "model.xml")
    assert main([str(checkpoint), "--openvino", str(tmp_path / "x.onnx")]) == 2


def test_openvino_low_precision_where_the_cpu_has_it(checkpoint, reference, monkeypatch):
    import lanit_rt.backends.openvino as backend_module
    pytest.importorskip("openvino")
    capabilities = backend_module.cpu_capabilities()
    if "BF16" not in capabilities:
        with pytest.raises(ValueError, match="this CPU has no bf16 arithmetic"):
            Translator.from_checkpoint(checkpoint, backend="openvino", precision="bf16")
        assert Translator.from_checkpoint(checkpoint, backend="openvino").backend.precision == "fp32"
        # Where OpenVINO would silently compile f32 anyway, the compiled hint is checked too.
        monkeypatch.setattr(backend_module, "cpu_capabilities", lambda core=None: (*capabilities, "BF16"))
        translator = Translator.from_checkpoint(checkpoint, backend="openvino", precision="bf16")
        with pytest.raises(ValueError, match="compiled .* for f32 instead of the requested bf16"):
            translator.translate(torch.zeros(1, 3, SIZE, SIZE), "beard")
        return
    translator = Translator.from_checkpoint(checkpoint, backend="openvino")
    assert translator.backend.precision == "bf16"  # picked automatically
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    diff = (translator.translate(images, "beard") - reference.translate(images, "beard")).abs().max()
    assert diff <= TOLERANCE["bf16"]


# --------------------------------------------------------------------------- int8 gate


def test_int8_graphs_run_only_above_the_psnr_line(checkpoint, reference, tmp_path):
    import onnx

    from lanit_export.quantize import psnr_db, quantize_onnx_int8
    images = _uint8(6, seed=11)
    int8_path = tmp_path / "model.int8.onnx"
    measured = quantize_onnx_int8(checkpoint / "model.onnx", int8_path, images[:4], images[4:])
    meta = {p.key: p.value for p in onnx.load(str(int8_path), load_external_data=False).metadata_props}
    assert meta["precision"] == "int8" and float(meta["psnr_db"]) == pytest.approx(measured, abs=0.01)
    assert "first/last conv fp32" in meta["int8_recipe"]
    ops = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # Images in another form than uint8 [N, S, S, 3] would calibrate on the wrong scale: refused
    from lanit_export.errors import ExportError
    side = images.shape[1]
    for calibration, message in ((images[:4].astype(np.float32) / 127.5 - 1, "uint8 numpy array"),
                                 (images[:4].transpose(0, 3, 1, 2).copy(), "got shape"),
                                 (images[:4, : side // 2, : side // 2], f"{side}x{side} images")):
        with pytest.raises(ExportError, match=f"calibration must be .*{message}"):
            quantize_onnx_int8(checkpoint / "model.onnx", tmp_path / "bad.onnx", calibration, images[4:])
    assert not (tmp_path / "bad.onnx").exists()

    def with_psnr(value):
        proto = onnx.load(str(int8_path))
        for prop in proto.metadata_props:
            if prop.key == "psnr_db":
                prop.value = value
        path = tmp_path / f"int8_{value}.onnx"
        onnx.save(proto, str(path))
        return path

    with pytest.raises(ArtifactError, match=r"measured 31\.5 dB PSNR against fp32 .* below the 40 dB"):
        Translator.from_checkpoint(checkpoint, backend="onnxruntime", artifact=with_psnr("31.5"))
    translator = Translator.from_checkpoint(checkpoint, backend="onnxruntime", artifact=with_psnr("41.0"),
                                            threads=1)
    images = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1
    got, want = translator.translate(images, "beard"), reference.translate(images, "beard")
    assert psnr_db(want.numpy(), got.numpy()) > 15  # runs the int8 graph (a quality figure, not a gate)
    assert psnr_db(want.numpy(), want.numpy()) == float("inf")
    assert psnr_db(np.zeros(4), np.full(4, 0.2)) == pytest.approx(10 * np.log10(4 / 0.04))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack is read through Linux's libc")
def test_openvino_leaves_the_signal_stack_alone(checkpoint, openvino_ir):
    """OpenVINO's CPU plugin moves the thread that loads it onto a signal stack of its own, freed
    with the plugin: a later Ctrl-C or SIGTERM then died with SIGSEGV (the full suite crashed in
    tests/test_training.py's Ctrl-C test). In a fresh process, with faulthandler's stack in place as
    under pytest: load the plugin, compile, query, translate, drop every model and Core we made,
    then the thread's signal stack must be the one it had and a signal must be handled."""
    pytest.importorskip("openvino")
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import ctypes, faulthandler, gc, signal, sys
        import numpy as np, torch
        faulthandler.enable()
        from lanit_rt import Translator
        from lanit_rt.backends import openvino as backend
        from lanit_export.openvino_export import openvino_runner

        def stack():
            s = backend._SignalStack()
            assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)) == 0
            return s.ss_sp, s.ss_flags, s.ss_size

        before = stack()
        backend.cpu_capabilities()
        t = Translator.from_checkpoint({str(checkpoint)!r}, backend="openvino", precision="fp32",
                                       threads=1, artifact={str(openvino_ir)!r})
        t.translate(torch.zeros(1, 3, {SIZE}, {SIZE}), "beard")
        run = openvino_runner({str(openvino_ir)!r})
        run({{"image": np.zeros((1, 3, {SIZE}, {SIZE}), np.float32),
             "domain_weights": np.ones((1, {len(CONFIG.domains)}), np.float32)}})
        del t, run
        gc.collect()
        if stack() != before:
            sys.exit(f"signal stack moved: {{before}} -> {{stack()}}")
        got = []
        signal.signal(signal.SIGINT, lambda *args: got.append(1))
        signal.raise_signal(signal.SIGINT)
        sys.exit(0 if got == [1] else "SIGINT not handled")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
