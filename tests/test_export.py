"""lanit_export/: ONNX artifacts vs the PyTorch generator, metadata, the CLI and TensorRT's pure pieces.

Two exports (fp32 and fp16, both graphs each) are made once per module through the CLI; each takes
~20 s on 2 CPU cores (the dynamo exporter dominates), hence the `slow` marks on the tests using them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lanit_rt import (Generator, LanitConfig, MappingNetwork, StyleEncoder,  # noqa: E402
                      latent_style_table, load_checkpoint, save_checkpoint)
from lanit_export import ExportError, MissingDependencyError, ValidationError  # noqa: E402
from lanit_export import tensorrt as trt_export  # noqa: E402
from lanit_export.cli import main  # noqa: E402
from lanit_export.graph_spec import METADATA_KEYS, read_metadata  # noqa: E402
from lanit_export.onnx_export import (build_onnx_model, check_graph, export_onnx,  # noqa: E402
                                      fp32_compute_nodes, style_graph_path)
from lanit_export.validate import (TOLERANCES, reference_output, validate_artifact,  # noqa: E402
                             validate_onnx, validation_targets)

CONFIG = LanitConfig(domains=("a", "b", "c"), img_size=32, base_dim=8, max_dim=32, style_dim=16,
                     mapping_dim=32)
TRT_HINT = "pip install 'lanit-rt[tensorrt]'"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1234)
    generator, mapping, encoder = Generator(CONFIG), MappingNetwork(CONFIG), StyleEncoder(CONFIG)
    # Non-trivial norm affines so the fp32-norm path is exercised with real values.
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, torch.nn.InstanceNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    folder = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(folder, CONFIG, generator, mapping, encoder,
                    latent_table=latent_style_table(mapping, num_z=64))
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint(checkpoint)


def _cli_export(checkpoint: Path, out: Path, *extra: str) -> Path:
    assert main([str(checkpoint), "--onnx", str(out), *extra]) == 0
    return out


EXPORT_UMASK = 0o027  # not the usual 0o022, so the files' mode shows the umask was applied


@pytest.fixture(scope="module")
def fp32_onnx(checkpoint, tmp_path_factory) -> Path:
    previous = os.umask(EXPORT_UMASK)
    try:
        return _cli_export(checkpoint, tmp_path_factory.mktemp("fp32") / "gen.onnx")
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def fp16_onnx(checkpoint, tmp_path_factory) -> Path:
    return _cli_export(checkpoint, tmp_path_factory.mktemp("fp16") / "gen.onnx", "--fp16")


@pytest.fixture(params=["fp32", "fp16"])
def exported(request) -> tuple[str, Path]:
    return request.param, request.getfixturevalue(f"{request.param}_onnx")


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(batch: int, seed: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, CONFIG.img_size, CONFIG.img_size, generator=gen) * 2 - 1).numpy()


MULTI_HOT = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [1, 0, 0], [0, 0, 1],
                      [0.2, 0.7, 0.0], [3, 0, 1]], np.float32)


# ----------------------------------------------------------------------------- ONNX vs PyTorch

@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_domain_weights_graph_matches_pytorch_multi_hot(exported, model, batch):
    precision, path = exported
    images, weights = _images(batch, seed=batch), MULTI_HOT[:batch]
    got = _session(path).run(["translated"], {"image": images, "domain_weights": weights})[0]
    with torch.no_grad():
        style = model.domain_style(torch.from_numpy(weights))  # PyTorch's multi-hot style mixing
        expected = model.generator(torch.from_numpy(images), style).numpy()
    assert got.shape == (batch, 3, 32, 32) and got.dtype == np.float32
    assert expected.std() > 0.05  # the comparison is not between two near-constant images
    assert np.abs(got - expected).max() <= TOLERANCES[precision]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_style_graph_matches_pytorch(exported, model, batch):
    precision, path = exported
    images = _images(batch, seed=10 + batch)
    styles = torch.randn(batch, CONFIG.style_dim, generator=torch.Generator().manual_seed(batch)).numpy()
    got = _session(style_graph_path(path)).run(["translated"], {"image": images, "style": styles})[0]
    with torch.no_grad():
        expected = model.generator(torch.from_numpy(images), torch.from_numpy(styles)).numpy()
    assert np.abs(got - expected).max() <= TOLERANCES[precision]


@pytest.mark.slow
def test_weights_are_normalised_in_graph_and_match_style_graph(fp32_onnx, model):
    images = np.repeat(_images(1, seed=3), 4, axis=0)
    weights = np.array([[1, 1, 0], [5, 5, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    out = _session(fp32_onnx).run(["translated"], {"image": images, "domain_weights": weights})[0]
    assert np.abs(out[0] - out[1]).max() < 1e-5  # same target, different scale
    assert np.abs(out[2] - out[3]).max() > 1e-2  # different domains really differ
    styles = model.domain_style(torch.from_numpy(weights)).numpy()
    via_style = _session(style_graph_path(fp32_onnx)).run(["translated"], {"image": images, "style": styles})[0]
    assert np.abs(out - via_style).max() < 1e-4  # baked AdaIN table == AdaIN(mixed style)


@pytest.mark.slow
def test_an_all_zero_row_gives_the_equal_weights_output_not_nan(exported):
    """The Translator refuses an all-zero row; a caller of the bare graph gets the documented
    defined output (equal weights over every domain) in that row, and the other rows are unchanged."""
    precision, path = exported
    session = _session(path)
    images = np.repeat(_images(1, seed=5), 3, axis=0)
    weights = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0]], np.float32)
    out = session.run(["translated"], {"image": images, "domain_weights": weights})[0]
    assert np.isfinite(out).all()
    assert np.abs(out[0] - out[1]).max() < 1e-5
    alone = session.run(["translated"], {"image": images[2:], "domain_weights": weights[2:]})[0]
    assert np.abs(out[2:] - alone).max() < 1e-5


@pytest.mark.slow
def test_samples_are_independent_of_batch(exported):
    _, path = exported
    session = _session(path)
    images, weights = _images(8, seed=7), MULTI_HOT
    batched = session.run(["translated"], {"image": images, "domain_weights": weights})[0]
    single = session.run(["translated"], {"image": images[5:6], "domain_weights": weights[5:6]})[0]
    assert np.abs(batched[5:6] - single).max() < 1e-5  # per-instance norm, no batch statistics


# ----------------------------------------------------------------------------- graph and metadata

@pytest.mark.slow
def test_metadata_round_trips(exported, model):
    precision, path = exported
    for file, kind in ((path, "domain_weights"), (style_graph_path(path), "style")):
        meta = read_metadata(file)
        assert set(METADATA_KEYS) <= set(meta)
        assert LanitConfig.from_json(meta["lanit_config"]) == model.config
        assert json.loads(meta["domains"]) == list(CONFIG.domains)
        assert (meta["precision"], meta["kind"], meta["io_dtype"]) == (precision, kind, "float32")
        proto = onnx.load(str(file))
        assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18


@pytest.mark.slow
def test_fp16_graph_keeps_norm_statistics_fp32(fp16_onnx, fp32_onnx, model):
    proto = onnx.load(str(fp16_onnx))
    summary = check_graph(proto, CONFIG, "domain_weights", "fp16")
    assert summary.convs > 0 and summary.fp16_convs == summary.convs
    assert summary.instance_norms > 0 and summary.reduce_means > 0
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
    types.update({i.name: i.data_type for i in inferred.initializer})
    for node in inferred.node:
        if node.op_type in ("InstanceNormalization", "ReduceMean"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "Conv":
            assert types[node.input[1]] == onnx.TensorProto.FLOAT16, node.name
    # The same checker rejects an fp32 graph claimed as fp16.
    with pytest.raises(ExportError, match="convolutions in fp16"):
        check_graph(onnx.load(str(fp32_onnx)), CONFIG, "domain_weights", "fp16")


@pytest.mark.slow
def test_check_graph_rejects_broken_graphs(fp32_onnx):
    proto = onnx.load(str(fp32_onnx))
    check_graph(proto, CONFIG, "domain_weights", "fp32")
    static = onnx.ModelProto()
    static.CopyFrom(proto)
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(ExportError, match="dynamic 'batch'"):
        check_graph(static, CONFIG, "domain_weights", "fp32")
    old = onnx.ModelProto()
    old.CopyFrom(proto)
    for opset in old.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 17
    with pytest.raises(ExportError, match="opset 17"):
        check_graph(old, CONFIG, "domain_weights", "fp32")
    with pytest.raises(ExportError, match="after the batch axis"):
        check_graph(proto, LanitConfig(domains=("a", "b"), img_size=32), "domain_weights", "fp32")


def test_opset_below_18_is_refused(model):
    with pytest.raises(ExportError, match="opset 17"):
        build_onnx_model(model, opset=17)


@pytest.mark.slow
def test_failed_validation_leaves_no_artifact(model, fp32_onnx, tmp_path, monkeypatch):
    import lanit_export.onnx_export as onnx_export

    # Re-use the traced graphs (tracing is what makes exports slow); the write/validate/rename
    # path under test is the real one. A zero tolerance makes the second graph fail validation
    # after the first has passed: neither may be left behind.
    graphs = {"domain_weights": onnx.load(str(fp32_onnx)),
              "style": onnx.load(str(style_graph_path(fp32_onnx)))}
    monkeypatch.setattr(onnx_export, "_trace", lambda model, kind, precision, opset: graphs[kind])
    monkeypatch.setitem(TOLERANCES, "fp32", 1.0)
    export_onnx(model, tmp_path / "ok.onnx", "fp32")
    assert sorted(os.listdir(tmp_path)) == ["ok.onnx", "ok.style.onnx"]

    calls = []

    def validate_then_fail(path, model, kind, precision):
        calls.append(kind)
        report = validate_onnx(path, model, kind, precision)
        if kind == "style":
            report.tolerance = 0.0
        return report

    monkeypatch.setattr("lanit_export.validate.validate_onnx", validate_then_fail)
    with pytest.raises(ValidationError, match="FAILED"):
        export_onnx(model, tmp_path / "bad.onnx", "fp32")
    assert calls == ["domain_weights", "style"]
    assert sorted(os.listdir(tmp_path)) == ["ok.onnx", "ok.style.onnx"]


@pytest.mark.slow
def test_exported_graphs_get_the_permissions_open_would_give(fp32_onnx):
    expected = 0o666 & ~EXPORT_UMASK
    for path in (fp32_onnx, style_graph_path(fp32_onnx)):
        assert os.stat(path).st_mode & 0o777 == expected, oct(os.stat(path).st_mode)


def _no_tracing(monkeypatch):
    import lanit_export.onnx_export as onnx_export

    def fail(*args, **kwargs):
        raise AssertionError("output paths must be checked before tracing")

    monkeypatch.setattr(onnx_export, "_build_checked", fail)


def test_unwritable_outputs_are_refused_before_tracing(model, tmp_path, monkeypatch, refuse_new_files):
    _no_tracing(monkeypatch)
    (tmp_path / "afile").write_text("a regular file")
    with pytest.raises(ExportError, match="cannot create folder .*afile"):
        export_onnx(model, tmp_path / "afile" / "g.onnx")
    with pytest.raises(ExportError, match="cannot create folder .*afile.*deeper"):
        export_onnx(model, tmp_path / "afile" / "deeper" / "g.onnx")
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(ExportError, match="d.onnx is an existing folder"):
        export_onnx(model, tmp_path / "d.onnx")
    (tmp_path / "e.style.onnx").mkdir()
    with pytest.raises(ExportError, match="e.style.onnx is an existing folder"):
        export_onnx(model, tmp_path / "e.onnx")
    (tmp_path / "ro").mkdir()
    refuse_new_files(tmp_path / "ro")
    with pytest.raises(ExportError, match="cannot write in folder .*ro.*Permission denied"):
        export_onnx(model, tmp_path / "ro" / "g.onnx")
    assert sorted(os.listdir(tmp_path)) == ["afile", "d.onnx", "e.style.onnx", "ro"]
    assert os.listdir(tmp_path / "ro") == []


# ----------------------------------------------------------------------------- validation helpers

@pytest.mark.parametrize("batch", [1, 3, 8])
def test_validation_targets_are_multi_hot_and_valid(batch):
    targets = validation_targets(5, batch)
    assert targets.shape == (batch, 5)
    assert (targets >= 0).all() and (targets.sum(axis=1) > 0).all()
    assert (targets > 0).sum(axis=1)[0] >= 2  # every batch size sees a multi-hot target
    if batch == 8:
        assert len({tuple(r) for r in targets}) == 8


def test_validate_artifact_catches_errors_above_tolerance(model):
    def perturbed(offset):
        def run(inputs):
            return reference_output(model, "domain_weights", inputs) + offset
        return run

    ok = validate_artifact(perturbed(5e-5), model, "domain_weights", "fp32", batches=(1, 3))
    assert ok.passed and ok.worst == pytest.approx(5e-5, rel=1e-2)
    bad = validate_artifact(perturbed(1e-3), model, "domain_weights", "fp32", batches=(1, 3))
    assert not bad.passed and "FAILED" in bad.describe("x")
    assert validate_artifact(perturbed(1e-3), model, "domain_weights", "fp16", batches=(1,)).passed

    def one_pixel_off(inputs):  # the worst error, not the mean, decides: one pixel is enough
        out = reference_output(model, "domain_weights", inputs).copy()
        out[0, 0, 0, 0] += 1e-3
        return out

    bad = validate_artifact(one_pixel_off, model, "domain_weights", "fp32", batches=(1, 3))
    assert not bad.passed and bad.worst == pytest.approx(1e-3, rel=1e-2)


# ----------------------------------------------------------------------------- CLI errors

def _cli_error(capsys, argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lanit-export: error:")
    return code, lines[0]


def test_cli_missing_checkpoint(capsys, tmp_path):
    code, line = _cli_error(capsys, [tmp_path / "nope", "--onnx", tmp_path / "new" / "sub" / "o.onnx"])
    assert code != 0 and "no LANIT checkpoint" in line
    assert list(tmp_path.iterdir()) == []  # the output's folders are made only for a real checkpoint


def test_cli_expands_a_tilde_in_every_path(capsys, checkpoint, tmp_path, monkeypatch):
    """A quoted "~/x" (or --onnx=~/x) reaches the program unexpanded: both the early output check
    and the writer must read it as the home folder (the writer once took it literally)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    written = []
    monkeypatch.setattr("lanit_export.onnx_export.export_onnx",
                        lambda model, out_path, *args, **kwargs: written.append(out_path) or [])
    monkeypatch.chdir(tmp_path)
    assert main([str(checkpoint), "--onnx", "~/exports/g.onnx"]) == 0
    assert written == [str(tmp_path / "home" / "exports" / "g.onnx")]
    assert not (tmp_path / "~").exists()


def test_cli_ctrl_c_is_one_line(capsys, checkpoint, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lanit_export.onnx_export.export_onnx", interrupted)
    assert main([str(checkpoint), "--onnx", str(tmp_path / "g.onnx")]) == 130
    assert capsys.readouterr().err.strip() == "lanit-export: interrupted; no partial file was written"


def test_cli_foreign_checkpoints(capsys, tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"w": torch.zeros(2)}, str(foreign / "model.safetensors"))
    code, line = _cli_error(capsys, [foreign, "--onnx", tmp_path / "o.onnx"])
    assert code != 0 and "not a LANIT checkpoint" in line
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not tensors")
    code, line = _cli_error(capsys, [junk, "--onnx", tmp_path / "o.onnx"])
    assert code != 0 and "not a safetensors file" in line
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("argv, message", [
    (["--trt", "int8"], "unknown precision 'int8'"),
    (["--trt", "fp16", "--min-batch", "8", "--max-batch", "4"], "empty batch range"),
    (["--trt", "fp32", "--min-batch", "2", "--opt-batch", "1"], "outside the batch range"),
    (["--trt", "fp32", "--max-batch", "0"], "positive integer"),
    (["--trt", "fp16", "--fp16"], "--fp16 applies to --onnx"),
    (["--onnx", "out.onnx", "--max-batch", "4"], "--max-batch applies only with --trt or --triton-repo DIR"),
    (["--onnx", "out.onnx", "--min-batch", "1", "--out", "x.engine"], "--min-batch, --out apply only with --trt"),
    (["--openvino", "m.xml", "--max-batch", "4"], "--max-batch applies only to ONNX and TensorRT exports, not to "
                                                  "--openvino"),
    (["--onnx", "out.txt"], "needs a file name ending in .onnx"),
    (["--onnx", ".onnx"], "needs a file name ending in .onnx (e.g. model.onnx), got '.onnx'"),
    ([], "one of the arguments --onnx --trt"),
])
def test_cli_bad_arguments(capsys, checkpoint, argv, message):
    code, line = _cli_error(capsys, [checkpoint, *argv])
    assert code != 0 and message in line


@pytest.mark.parametrize("make, out, message", [
    ("file", "afile/g.onnx", "not a folder"),
    ("dir", "d.onnx", "is an existing folder"),
])
def test_cli_unwritable_output_is_one_line_before_tracing(capsys, checkpoint, tmp_path, monkeypatch,
                                                          make, out, message):
    _no_tracing(monkeypatch)
    if make == "file":
        (tmp_path / "afile").write_text("a regular file")
    else:
        (tmp_path / "d.onnx").mkdir()
    code, line = _cli_error(capsys, [checkpoint, "--onnx", tmp_path / out])
    assert code == 1 and message in line


@pytest.mark.parametrize("device, message", [
    ("banana", "unknown --device 'banana'"),
    ("meta", "--device meta cannot run the reference model"),
    ("cuda:99", "--device cuda:99 is not available"),  # no machine has 100 GPUs
])
def test_cli_bad_device_is_a_usage_error(capsys, checkpoint, tmp_path, monkeypatch, device, message):
    _no_tracing(monkeypatch)
    code, line = _cli_error(capsys, [checkpoint, "--onnx", tmp_path / "g.onnx", "--device", device])
    assert code == 2 and message in line
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_os_errors_in_one_line(capsys, checkpoint, tmp_path, monkeypatch):
    def read_only(model, out_path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out_path))

    monkeypatch.setattr("lanit_export.onnx_export.export_onnx", read_only)
    code, line = _cli_error(capsys, [checkpoint, "--onnx", tmp_path / "g.onnx"])
    assert code == 1 and "Permission denied" in line and "g.onnx" in line


def test_cli_trt_without_tensorrt_names_the_extra(capsys, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    out = tmp_path / "engines" / "g.engine"
    code, line = _cli_error(capsys, [checkpoint, "--trt", "fp16", "--out", out])
    assert code != 0 and TRT_HINT in line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- TensorRT pure pieces

def test_tensorrt_entry_points_raise_clear_error_and_write_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"lanit-rt\[tensorrt\]"):
        trt_export.export_tensorrt(model, tmp_path / "g.engine", "fp16")
    with pytest.raises(MissingDependencyError, match=r"lanit-rt\[tensorrt\]"):
        trt_export.build_engine_bytes(tmp_path / "missing.onnx", "fp32", trt_export.batch_profile())
    assert list(tmp_path.iterdir()) == []


def test_sidecar_gets_the_permissions_open_would_give(model, tmp_path):
    data = trt_export.engine_sidecar(model.config, "fp32", trt_export.batch_profile(),
                                     tensorrt_version="10.x")
    previous = os.umask(0o027)
    try:
        path = trt_export.write_sidecar(tmp_path / "g.engine", data)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert list(tmp_path.iterdir()) == [path]


def test_batch_profile_defaults_and_clamping():
    assert trt_export.batch_profile() == trt_export.BatchProfile(1, 8, 32)
    assert trt_export.batch_profile(max_batch=4) == trt_export.BatchProfile(1, 4, 4)
    assert trt_export.batch_profile(min_batch=16) == trt_export.BatchProfile(16, 16, 32)
    assert trt_export.batch_profile(min_batch=64) == trt_export.BatchProfile(64, 64, 64)
    assert trt_export.batch_profile(2, 3, 5) == trt_export.BatchProfile(2, 3, 5)


@pytest.mark.parametrize("args, message", [
    ((5, None, 4), "empty batch range"), ((1, 9, 8), "outside"), ((0, None, None), "positive"),
    ((None, None, -1), "positive"), ((True, None, None), "positive"), ((1.5, None, None), "positive"),
])
def test_batch_profile_rejects_bad_ranges(args, message):
    with pytest.raises(ExportError, match=message):
        trt_export.batch_profile(*args)


def test_profile_shapes():
    profile = trt_export.BatchProfile(1, 4, 16)
    shapes = trt_export.profile_shapes(profile, CONFIG)
    assert shapes == {"image": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32)),
                      "domain_weights": ((1, 3), (4, 3), (16, 3))}
    style = trt_export.profile_shapes(profile, CONFIG, kind="style")
    assert style["style"] == ((1, 16), (4, 16), (16, 16))


@pytest.mark.slow
def test_fp16_graph_types_keep_the_statistics_in_fp32(fp16_onnx):
    """A strongly typed TensorRT network takes every type from the graph: the fp16 graph itself must
    say that the normalisation statistics run in fp32 while the convolutions run in fp16."""
    proto = onnx.load(str(fp16_onnx))
    fp32_nodes = set(fp32_compute_nodes(proto))
    by_type = {n.name: n.op_type for n in proto.graph.node}
    stats = {n for n, t in by_type.items() if t in ("InstanceNormalization", "ReduceMean", "Sqrt")}
    convs = {n for n, t in by_type.items() if t == "Conv"}
    assert stats and stats <= fp32_nodes and not (convs & fp32_nodes)


def _fake_tensorrt(major: int, build=b"engine", parse_ok=True, cache_matches=True, builder_fails=False):
    """A stand-in for the documented tensorrt Python API of one major version (10 or 11) that
    records what the exporter calls. 11.x dropped BuilderFlag.FP16 / OBEY_PRECISION_CONSTRAINTS
    (and ILayer.precision / set_output_type); STRONGLY_TYPED is 1 << 1 in 10.x, an ignored 1 << 0 in
    11.x. `build`: bytes to return, None (fails after logging the root cause and then the generic
    wrapper, as TensorRT does) or an exception to raise. `cache_matches=False`: set_timing_cache
    refuses a non-empty cache, as for one from another GPU. `builder_fails`: Builder() logs a
    warning and raises as the bindings do without a usable CUDA device."""
    import types

    calls: dict = {"set_flag": [], "clear_flag": [], "shapes": {}, "get_layer": 0, "timing_caches": []}

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    if major == 10:
        class NetworkDefinitionCreationFlag:
            EXPLICIT_BATCH, STRONGLY_TYPED, PREFER_JIT_PYTHON_PLUGINS, PREFER_AOT_PYTHON_PLUGINS = range(4)

        class BuilderFlag:
            FP16, BF16, INT8, TF32, OBEY_PRECISION_CONSTRAINTS, PREFER_PRECISION_CONSTRAINTS = range(6)
    else:
        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED, PREFER_JIT_PYTHON_PLUGINS, PREFER_AOT_PYTHON_PLUGINS = range(3)

        class BuilderFlag:
            TF32, REFIT, SPARSE_WEIGHTS = range(3)

    class Network:
        num_layers = 3

        def get_layer(self, index):  # a strongly typed build has no reason to visit layers
            calls["get_layer"] += 1
            raise AssertionError("layers are not to be touched in a strongly typed network")

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"cache:" + self.data

    class BuilderConfig:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            calls["set_flag"].append(flag)

        def clear_flag(self, flag):
            calls["clear_flag"].append(flag)

        def add_optimization_profile(self, profile):  # returns the profile's index
            calls["profiles"] = calls.get("profiles", 0) + 1
            return calls["profiles"] - 1

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):  # False: a cache from another device
            calls["timing_caches"].append(cache.data)
            return cache_matches or cache.data == b""

    class Profile:
        def set_shape(self, name, low, opt, high):  # the bindings check rank and min <= opt <= max
            low, opt, high = tuple(low), tuple(opt), tuple(high)
            if not len(low) == len(opt) == len(high) or not all(
                    a <= b <= c for a, b, c in zip(low, opt, high)):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            calls["shapes"][name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            if builder_fails:
                logger.log(Severity.WARNING, "CUDA initialization failure with error: 35")
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self.logger = logger

        def create_network(self, flags=0):
            calls["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if isinstance(build, Exception):
                raise build
            if build is None:
                self.logger.log(Severity.WARNING, "a warning")
                self.logger.log(Severity.ERROR, "IBuilder::buildSerializedNetwork: Error Code 4:\n"
                                "Internal Error (no implementation for node /conv)")
                self.logger.log(Severity.ERROR, "[builder.cpp::buildSerializedNetwork::619] Error Code 2: "
                                "Internal Error (Assertion engine != nullptr failed. )")
            return build

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls["parsed"] = path
            return parse_ok

        def get_error(self, index):
            return "In node 3 (parseGraph):\nUNSUPPORTED_NODE: Cast"

    trt = types.SimpleNamespace(
        __version__="10.13.0" if major == 10 else "11.4.0", ILogger=ILogger, Builder=Builder,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag, BuilderFlag=BuilderFlag,
        OnnxParser=OnnxParser, MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    return trt, calls


@pytest.mark.slow
@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engine_build_config_runs_on_tensorrt_10_and_11(major, precision, fp16_onnx, fp32_onnx,
                                                        tmp_path, monkeypatch):
    trt, calls = _fake_tensorrt(major)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "g.timing").write_bytes(b"old")
    onnx_path = fp16_onnx if precision == "fp16" else fp32_onnx
    logged = []
    engine, cache = trt_export.build_engine_bytes(onnx_path, precision, trt_export.BatchProfile(1, 4, 16),
                                                  tmp_path / "g.timing", 2, log=logged.append)
    assert (engine, cache) == (b"engine", b"cache:old") and calls["timing_caches"] == [b"old"]
    strongly_typed = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert calls["network_flags"] == 1 << strongly_typed == (2 if major == 10 else 1)
    assert calls["set_flag"] == [] and calls["get_layer"] == 0  # no FP16, no precision constraints
    assert calls["clear_flag"] == [trt.BuilderFlag.TF32]  # the fp16 graph's fp32 parts stay fp32
    assert calls["workspace"] == ("workspace", 2 << 30) and calls["profiles"] == 1
    assert calls["shapes"]["image"] == ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    assert logged and "strongly typed" in logged[0] and "TF32 off" in logged[0]


@pytest.mark.slow
@pytest.mark.parametrize("build, message", [
    (None, r"failed to build a fp16 engine from .*: IBuilder::buildSerializedNetwork: Error Code 4: "
           r"Internal Error \(no implementation for node /conv\) \(then: \[builder.cpp::.*"
           r"Assertion engine != nullptr failed. \)\)$"),
    (RuntimeError("out of memory\n  at builder.cpp:12"),
     r"failed to build a fp16 engine from .*: RuntimeError: out of memory at builder.cpp:12$"),
])
def test_engine_builder_failures_are_one_line_errors(build, message, fp16_onnx, monkeypatch):
    trt, _ = _fake_tensorrt(11, build=build)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=message) as info:
        trt_export.build_engine_bytes(fp16_onnx, "fp16", trt_export.BatchProfile(1, 1, 2))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_engine_parser_errors_and_unsupported_versions(fp16_onnx, monkeypatch):
    trt, _ = _fake_tensorrt(10, parse_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=r"could not parse .*In node 3 \(parseGraph\): UNSUPPORTED_NODE"):
        trt_export.build_engine_bytes(fp16_onnx, "fp16", trt_export.BatchProfile(1, 1, 2))
    trt.__version__ = "8.6.1"
    with pytest.raises(ExportError, match=r"TensorRT 8.6.1 is not supported: .* 10 or 11.x"):
        trt_export.build_engine_bytes(fp16_onnx, "fp16", trt_export.BatchProfile(1, 1, 2))


@pytest.mark.slow
def test_engine_builder_set_up_failures_quote_what_tensorrt_logged(fp16_onnx, monkeypatch):
    """Without a usable GPU the bindings raise a bare pybind TypeError; the cause is only logged."""
    trt, _ = _fake_tensorrt(10, builder_fails=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(ExportError, match=r"failed to set up the builder: TypeError: pybind11::init\(\): "
                       r"factory function returned nullptr \(TensorRT logged: no error logged; last "
                       r"warning: CUDA initialization failure with error: 35\)$"):
        trt_export.build_engine_bytes(fp16_onnx, "fp16", trt_export.BatchProfile(1, 1, 2))


@pytest.mark.slow
def test_a_timing_cache_from_another_gpu_is_replaced_not_kept(fp16_onnx, tmp_path, monkeypatch):
    trt, calls = _fake_tensorrt(11, cache_matches=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "g.timing").write_bytes(b"other gpu")
    logged = []
    _, cache = trt_export.build_engine_bytes(fp16_onnx, "fp16", trt_export.BatchProfile(1, 1, 2),
                                             tmp_path / "g.timing", log=logged.append)
    assert calls["timing_caches"] == [b"other gpu", b""] and cache == b"cache:"
    assert any("does not match this GPU / TensorRT" in line for line in logged)


def test_export_tensorrt_checks_version_and_gpu_before_any_work(model, tmp_path, monkeypatch):
    trt, calls = _fake_tensorrt(10)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportError, match=r"^building a TensorRT engine needs a CUDA GPU, and torch sees none"):
        trt_export.export_tensorrt(model, tmp_path / "g.engine", "fp16")
    trt.__version__ = "8.6.1"
    with pytest.raises(ExportError, match=r"TensorRT 8.6.1 is not supported"):
        trt_export.export_tensorrt(model, tmp_path / "g.engine", "fp16")
    assert list(tmp_path.iterdir()) == [] and "parsed" not in calls  # no ONNX export, no build


def test_engines_are_validated_at_their_opt_and_max_batch_too():
    assert trt_export.validation_batches(trt_export.BatchProfile(1, 8, 32)) == [1, 3, 8, 32]
    assert trt_export.validation_batches(trt_export.BatchProfile(1, 16, 64)) == [1, 3, 8, 16, 64]
    assert trt_export.validation_batches(trt_export.BatchProfile(4, 6, 6)) == [4, 6]
    assert trt_export.validation_batches(trt_export.BatchProfile(1, 1, 2)) == [1, 2]


class _FakeEngine:
    """The ICudaEngine calls the TensorRT backend reads: I/O tensor names and dtypes, profile shapes."""

    def __init__(self, names, dtypes, low=1, high=32):
        self.names, self.dtypes, self.low, self.high = names, dtypes, low, high
        self.num_io_tensors = len(names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile_index):
        assert name == "image" and profile_index == 0
        return [(n, 3, 32, 32) for n in (self.low, 8, self.high)]


def test_tensorrt_backend_reads_the_engines_tensors_and_batch_range(tmp_path):
    import types

    from lanit_rt.backends.base import ArtifactError
    from lanit_rt.backends.tensorrt import inspect_engine

    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16", int8="i8")
    names = ["image", "domain_weights", "translated"]
    engine = _FakeEngine(names, {"image": "f32", "domain_weights": "f32", "translated": "f16"}, 2, 16)
    dtypes, low, high = inspect_engine(trt, engine, tmp_path / "g.engine", "domain_weights")
    assert dtypes == {"image": torch.float32, "domain_weights": torch.float32, "translated": torch.float16}
    assert (low, high) == (2, 16)
    with pytest.raises(ArtifactError, match=r"engine tensors \['image', 'domain_weights', 'translated'\] "
                       r"differ from the expected \['image', 'style', 'translated'\]"):
        inspect_engine(trt, engine, tmp_path / "g.engine", "style")
    engine.dtypes["translated"] = "i8"
    with pytest.raises(ArtifactError, match="unsupported engine I/O dtype i8"):
        inspect_engine(trt, engine, tmp_path / "g.engine", "domain_weights")


def test_tensorrt_backend_sidecar_with_a_bad_batch_is_one_line(model, tmp_path):
    from lanit_rt.backends.base import ArtifactError
    from lanit_rt.backends.tensorrt import read_sidecar as backend_sidecar

    engine = tmp_path / "g.engine"
    engine.write_bytes(b"placeholder")
    data = trt_export.engine_sidecar(model.config, "fp16", trt_export.batch_profile(), tensorrt_version="10.9")
    trt_export.write_sidecar(engine, {**data, "max_batch": "32x"})
    with pytest.raises(ArtifactError, match=r"g.engine.json: max_batch is '32x', not a batch size$"):
        backend_sidecar(engine)
    trt_export.write_sidecar(engine, data)
    info = backend_sidecar(engine)
    assert (info["min_batch"], info["max_batch"], info["tensorrt_version"]) == (1, 32, "10.9")


@pytest.mark.slow
def test_sidecar_has_the_onnx_metadata_and_round_trips(fp16_onnx, model, tmp_path):
    profile = trt_export.BatchProfile(2, 4, 8)
    data = trt_export.engine_sidecar(model.config, "fp16", profile, tensorrt_version="10.x")
    meta = read_metadata(fp16_onnx)
    assert {k: data[k] for k in METADATA_KEYS} == {k: meta[k] for k in METADATA_KEYS}
    engine = tmp_path / "g.engine"
    path = trt_export.write_sidecar(engine, data)
    assert path == tmp_path / "g.engine.json"
    raw, config, read_profile = trt_export.read_sidecar(engine)
    assert raw == data and config == model.config and read_profile == profile
    path.write_text(json.dumps({**data, "max_batch": 1}))
    with pytest.raises(ExportError, match="empty batch range|outside"):
        trt_export.read_sidecar(engine)
    path.write_text("{")
    with pytest.raises(ExportError, match="not a lanit-rt engine sidecar"):
        trt_export.read_sidecar(engine)
