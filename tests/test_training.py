"""The trainer end to end on tiny data: outputs, resume, stage 2, torchrun, and CLI errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lanit_rt import load_checkpoint
from lanit_rt.config import ConfigError
from training import run
from training.config import TrainConfig
from training.acceleration import (COMPILE_MIN_STEPS, keep_freed_memory, release_freed_memory,
                                   should_compile)
from training.run_folder import RunError
from training.train import NothingToTrain, Trainer, TrainingInterrupted, train

DOMAINS = ("red", "green", "blue")
REPO = Path(__file__).resolve().parents[1]


def make_data(folder: Path, n: int = 12) -> Path:
    """Coloured discs on white, varied sizes and modes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    for i in range(n):
        size = int(rng.integers(24, 60))
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        img = np.full((size, size, 3), 255, np.uint8)
        img[disc] = colours[i % 3]
        Image.fromarray(img).save(folder / f"img_{i:02d}.{'png' if i % 2 else 'jpg'}")
    return folder


def tiny_cfg(tmp_path: Path, labeler: str, **changes) -> TrainConfig:
    base = dict(data=str(make_data(tmp_path / "data")), domains=DOMAINS, out=str(tmp_path / "run"),
                img_size=32, base_dim=8, max_dim=16, style_dim=8, latent_dim=4, mapping_dim=16,
                steps=4, batch_size=3, labeler=labeler, label_mode="topk", topk=1, log_every=1,
                sample_every=2, save_every=2, num_style_z=16, cache_dir=str(tmp_path / "cache"),
                template_set="face")
    base.update(changes)
    return TrainConfig(**base)


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_self_describing_run(tmp_path, tiny_labeler, capsys):
    out = train(tiny_cfg(tmp_path, tiny_labeler), progress=False)
    # no progress bar: a status line at each sample / save (every 2 steps here) instead
    status = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" (")[0] for line in status] == ["step 2/4", "step 4/4"]
    assert all(" steps/s): d " in line and ", cyc " in line for line in status)
    for name in ("model.safetensors", "config.json", "train_config.json", "train_state.pt",
                 "metrics.jsonl", "pseudo_labels.csv", "samples/step_000002.png",
                 "samples/step_000004.png"):
        assert (out / name).exists(), name
    model = load_checkpoint(out)
    assert model.config.domains == DOMAINS and model.metadata["step"] == 4
    assert model.latent_table.shape == (3, 8)
    labels = np.loadtxt(out / "pseudo_labels.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    if (labels.sum(0) > 0).all():  # a reference table needs labelled images of every domain
        assert model.reference_table.shape == (3, 8)
    else:
        assert model.reference_table is None
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float))
    # lanit-official, stage 1: diversity in the latent step only, no domain-regularisation loss
    assert "d_r1_ref" in records[0] and "g_ds_latent" in records[0]
    assert "g_ds_ref" not in records[0] and "g_dl_latent" not in records[0]
    lines = (out / "pseudo_labels.csv").read_text().splitlines()
    assert lines[0].split(",") == ["path", *DOMAINS] and len(lines) == 13
    grid = Image.open(out / "samples" / "step_000004.png")
    assert grid.width > 32 * 4 and grid.height > 32 * 6
    # Labelled: a title and column captions (dark text on white) above the first row of tiles.
    header = np.asarray(grid.convert("L"))[:20]
    assert (header < 100).sum() > 50 and (np.asarray(grid.convert("L"))[:2] == 255).all()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = model.generator(x, model.domain_style(torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_a_small_data_set_still_gets_both_halves_of_the_sample_sheet(tmp_path, tiny_labeler, monkeypatch):
    """Four images: two sources and two references (6 sources took them all, and the
    reference-guided half had no reference column)."""
    import training.grid as grid

    captions = []
    labelled = grid.labelled
    monkeypatch.setattr(grid, "labelled", lambda image, title, columns, *a, **k:
                        captions.append(columns) or labelled(image, title, columns, *a, **k))
    data = make_data(tmp_path / "four", n=4)
    train(tiny_cfg(tmp_path, tiny_labeler, data=str(data), steps=1, label_mode="topk"), progress=False)
    latent, reference = captions[-2:]
    assert latent[0] == reference[0] == "source"
    assert len([c for c in reference if c.startswith("ref: ")]) == 2


def test_resume_continues_the_same_loss_curve(tmp_path, tiny_labeler):
    straight = train(tiny_cfg(tmp_path / "a", tiny_labeler, ds_decay_steps=4), progress=False)
    half = tiny_cfg(tmp_path / "b", tiny_labeler, steps=2, ds_decay_steps=4)
    train(half, progress=False)
    resumed = train(half.replace(steps=4), resume=True, progress=False)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("d_", "g_")):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    wa = load_checkpoint(straight).generator.state_dict()
    wb = load_checkpoint(resumed).generator.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize("recipe", ["lanit-official", "lanit-rt"])
def test_stage_two_learns_prompts(tmp_path, tiny_labeler, recipe):
    cfg = tiny_cfg(tmp_path, tiny_labeler, stage=2, prompt_start=1, prompt_lr=1e-2, relabel_every=1,
                   steps=3, sample_every=10, save_every=10, recipe=recipe)
    trainer = Trainer(cfg, progress=False)
    before = [p.detach().clone() for p in trainer.labeler.prompt_bank.parameters()]
    assert before, "stage 2 has learnable prompt context"
    trainer.run()
    after = list(trainer.labeler.prompt_bank.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert (Path(cfg.out) / "prompts.safetensors").exists()
    records = read_metrics(Path(cfg.out))
    # the domain loss runs only once prompts are learned (step >= 1), in the latent step for
    # lanit-official and in both steps (with diversity) for lanit-rt
    assert ("g_dl_latent" in records[0]) == (recipe == "lanit-rt")
    assert "g_dl_latent" in records[-1]
    assert ("g_dl_ref" in records[-1]) == ("g_ds_ref" in records[-1]) == (recipe == "lanit-rt")


def test_cli_dry_run_prints_the_resolved_config(capsys):
    assert run.main(["--dry-run"]) == 0  # the embedded default: its data-dependent defaults spelled out
    printed = json.loads(capsys.readouterr().out)
    assert (printed["max_minutes"], printed["steps"], printed["lambda_id"], printed["template_set"],
            printed["label_mode"], printed["prompt_start"]) == (11.0, 3000, 10.0, "emoji", "topk", 1500)
    assert run.main(["--dry-run", "--steps", "7", "--set", "lr=2e-4", "--domains", "a, b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 7 and printed["lr"] == 2e-4 and printed["domains"] == ["a", "b"]
    assert printed["out"] == "runs/default"
    # The embedded default labels top-1 (its domains exclude each other); own data: adaptive.
    assert printed["label_mode"] == "topk" and printed["topk"] == 1
    assert run.main(["--dry-run", "--data", "/photos", "--domains", "a,b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # own data: adaptive labels, and a run folder named after the data (runs/default is the
    # embedded data's) unless --out names one
    assert printed["label_mode"] == "adaptive" and printed["out"] == "runs/photos"
    assert run.main(["--dry-run", "--data", "/photos/", "--domains", "a,b", "--out", "mine"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == "mine"
    assert TrainConfig(data="/photos", domains=("a", "b"), label_mode="threshold").label_rule == "threshold"
    with pytest.raises(ConfigError, match="--domains"):  # own data names its own domains
        TrainConfig(data="/photos")


def test_dl_loss_encode_size_resolution():
    # lanit-lite (convolutional) encodes generated images at 128 for the DL loss; others at their size.
    assert TrainConfig().dl_size(224) == 128 and TrainConfig().dl_size(96) == 96
    assert TrainConfig(labeler="lanit-lite:/my/heads.safetensors").dl_size(224) == 128
    assert TrainConfig(labeler="ViT-B-32").dl_size(224) == 224
    assert TrainConfig(labeler="ViT-B-32", dl_image_size=160).dl_size(224) == 160


@pytest.mark.parametrize("argv, message", [
    (["--domains", "only one"], "at least 2 domain"),
    (["--set", "nonsense=1"], "unknown config key"),
    (["--img-size", "48"], "power of two"),
    (["--domains-file", "/does/not/exist"], "cannot read domains file"),
    (["--domains", "blond hair,path"], "'path' cannot be a domain text"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    assert run.main(argv) == 2
    assert message in capsys.readouterr().err


def test_domains_file_from_a_windows_editor(tmp_path, capsys):
    windows = tmp_path / "domains.txt"
    windows.write_bytes("\ufeffblond hair\r\n  # hair colours above\r\n\r\nbeard\r\n".encode("utf-8"))
    assert run.main(["--dry-run", "--domains-file", str(windows)]) == 0
    assert json.loads(capsys.readouterr().out)["domains"] == ["blond hair", "beard"]
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("blond hair\nbeard\n".encode("utf-16"))
    assert run.main(["--dry-run", "--domains-file", str(utf16)]) == 2
    assert f"domains file {utf16} is not UTF-8 text" in capsys.readouterr().err


def test_cli_rejects_bad_data_before_any_work(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run.main(["--data", str(tmp_path / "empty"), "--domains", "a,b"]) == 2
    assert "no JPEG/PNG/WebP" in capsys.readouterr().err
    assert run.main(["--data", str(tmp_path / "missing"), "--domains", "a,b"]) == 2
    assert "does not exist" in capsys.readouterr().err
    make_data(tmp_path / "one", n=1)
    assert run.main(["--data", str(tmp_path / "one"), "--domains", "a,b", "--out", str(tmp_path / "r1")]) == 2
    assert "holds one image" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    (tmp_path / "one" / "broken.png").write_bytes(b"not a png")
    assert run.main(["--data", str(tmp_path / "one"), "--domains", "a,b", "--out", str(tmp_path / "r1")]) == 2
    assert "only 1 of the 2 images could be read; LANIT needs at least 2" in capsys.readouterr().err
    make_data(tmp_path / "data", n=3)
    # Before the output folder is looked at (a run already in it must not hide this).
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_state.pt").write_bytes(b"an earlier run")
    assert run.main(["--data", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert "--domains" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, tiny_labeler):
    data = make_data(tmp_path / "data")
    out = tmp_path / "ddp"
    sets = ["img_size=32", "base_dim=8", "max_dim=16", "style_dim=8", "latent_dim=4", "mapping_dim=16",
            "label_mode=topk", "sample_every=2", "save_every=10", "num_style_z=16", "log_every=1",
            f"cache_dir={tmp_path / 'cache'}", "template_set=face", "device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.run", "--data", str(data), "--domains", ",".join(DOMAINS), "--out", str(out),
           "--steps", "2", "--batch-size", "2", "--labeler", tiny_labeler, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # only rank 0 logs
    model = load_checkpoint(out)
    # Averaged gradients keep the replicas identical: rank 0's weights are the only ones saved,
    # so check the optimiser state was stepped twice from one run.
    assert model.metadata["step"] == 2


def test_time_budget_stops_cleanly_with_a_checkpoint(tmp_path, tiny_labeler, capsys, monkeypatch):
    # A budget that runs out after the third step, between logs (log_every=2): the last step is
    # logged all the same.
    monkeypatch.setattr(Trainer, "_stop_reason", lambda self, *args: "time" if self.step >= 3 else None)
    cfg = tiny_cfg(tmp_path / "between", tiny_labeler, steps=50, max_minutes=1.0, log_every=2)
    out = train(cfg, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [2, 3]
    assert load_checkpoint(out).metadata["step"] == 3
    monkeypatch.undo()

    cfg = tiny_cfg(tmp_path, tiny_labeler, steps=50, max_minutes=0.0)
    out = train(cfg, progress=True)
    printed = capsys.readouterr()  # the bar says that the run may end before its 50 steps
    assert "training (stops within 0.0 min)" in printed.err
    assert "time budget of 0.0 min reached at step 0 of 50; the rest: python -m training.run " \
           f"--out {tmp_path / 'run'} --resume" in printed.out
    model = load_checkpoint(out)
    assert model.metadata["step"] == 0 and model.metadata["final"] is True
    assert cfg.replace(max_minutes=None, data=None).time_budget_s == 11 * 60
    assert cfg.replace(max_minutes=None).time_budget_s is None


@pytest.mark.parametrize("started_ago, reserve_s, steps_done", [
    (0.0, 0.0, 2),      # a minute is plenty for two tiny steps
    (61.0, 0.0, 0),     # the minute was spent before train() was called (loading, labelling)
    (0.0, 60.0, 0),     # the caller keeps the whole minute for what follows (the closing evaluation)
])
def test_time_budget_counts_from_the_commands_start_and_leaves_the_reserve(
        tmp_path, tiny_labeler, started_ago, reserve_s, steps_done):
    cfg = tiny_cfg(tmp_path, tiny_labeler, steps=2, max_minutes=1.0)
    out = train(cfg, progress=False, started=time.monotonic() - started_ago, reserve_s=reserve_s)
    model = load_checkpoint(out)
    assert model.metadata["step"] == steps_done and model.metadata["final"] is True


@pytest.mark.parametrize("extra, reserve_s", [((), 0.0), (("--eval",), run.CLOSING_EVAL_RESERVE_S)])
def test_cli_times_the_run_from_its_start_and_reserves_the_closing_evaluation(
        tmp_path, tiny_labeler, monkeypatch, extra, reserve_s):
    seen = {}

    def fake_train(cfg, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop here: the arguments are what this test is about

    monkeypatch.setattr(run, "train", fake_train)
    before = time.monotonic()
    assert run.main(tiny_argv(tmp_path, tiny_labeler, *extra), started=before - 30.0) == 130
    assert seen["started"] == before - 30.0 and seen["reserve_s"] == reserve_s
    run.main(tiny_argv(tmp_path, tiny_labeler))  # called without a start: the clock starts with the call
    assert before <= seen["started"] <= time.monotonic()


# ----------------------------------------------------------------------------- user-facing failures

TINY_SETS = ("base_dim=8", "max_dim=16", "style_dim=8", "latent_dim=4", "mapping_dim=16",
             "label_mode=topk", "log_every=1", "sample_every=2", "save_every=2", "num_style_z=16",
             "template_set=face")


def tiny_argv(tmp_path: Path, labeler: str, *extra: str) -> list[str]:
    """CLI arguments for the tiny run of `tiny_cfg` (1 step); `extra` comes last, so it wins."""
    argv = ["--data", str(make_data(tmp_path / "data")), "--domains", ",".join(DOMAINS),
            "--out", str(tmp_path / "run"), "--img-size", "32", "--steps", "1", "--batch-size", "3",
            "--labeler", labeler, "--no-progress", "--set", f"cache_dir={tmp_path / 'cache'}"]
    for setting in TINY_SETS:
        argv += ["--set", setting]
    return argv + list(extra)


def test_cli_prints_warnings_as_single_lines(tmp_path, tiny_labeler, capsys):
    argv = tiny_argv(tmp_path, tiny_labeler)
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    assert run.main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping unreadable image {tmp_path / 'data' / 'broken.png'}" in err
    assert "UserWarning" not in err and "check_images(" not in err  # no file:line and source line
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["skipped_images"]


def test_cli_reports_labeler_and_file_errors_in_one_line(tmp_path, tiny_labeler, capsys):
    assert run.main(tiny_argv(tmp_path, "nosuch")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nosuch" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "templates").mkdir()  # IsADirectoryError: an OSError that is no FileNotFoundError
    argv = tiny_argv(tmp_path, tiny_labeler, "--out", str(tmp_path / "run2"),
                     "--set", f"templates_file={tmp_path / 'templates'}")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "templates" in err and len(err.strip().splitlines()) == 1
    assert run.main(tiny_argv(tmp_path, tiny_labeler, "--out", str(tmp_path / "run4"),
                              "--domains", "Red,red,blue")) == 2
    assert "'Red' and 'red' get the same text features" in capsys.readouterr().err
    argv = tiny_argv(tmp_path, tiny_labeler, "--out", str(tmp_path / "run3"), "--set", "templates_file=emoji")
    assert run.main(argv) == 2  # a built-in set's name given as a file
    err = capsys.readouterr().err
    assert "cannot read templates_file emoji" in err and "use --set template_set=emoji" in err


def test_cli_rejects_an_unusable_out_folder_before_any_work(tmp_path, refuse_new_files, capsys):
    # "nosuch" would fail at labelling time: the folder must be refused before that.
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert run.main(tiny_argv(tmp_path, "nosuch", "--out", str(afile / "run"))) == 2
    assert "cannot create folder" in capsys.readouterr().err
    assert run.main(tiny_argv(tmp_path, "nosuch", "--out", str(afile))) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert afile.read_text() == "not a folder"

    (tmp_path / "ro").mkdir()
    refuse_new_files(tmp_path / "ro")
    assert run.main(tiny_argv(tmp_path, "nosuch", "--out", str(tmp_path / "ro"))) == 2
    assert "cannot write in folder" in capsys.readouterr().err


def test_a_run_that_fails_before_writing_leaves_no_empty_folder(tmp_path, capsys):
    """A bad labeler fails while the run is set up: the folders made for --out go again, while a
    folder that was there before stays."""
    out = tmp_path / "runs" / "new"
    assert run.main(tiny_argv(tmp_path, str(tmp_path / "no_such_labeler"), "--out", str(out))) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    assert run.main(tiny_argv(tmp_path, str(tmp_path / "no_such_labeler"), "--out", str(tmp_path / "mine"))) == 2
    assert (tmp_path / "mine").is_dir()


def test_ctrl_c_says_whether_anything_was_saved(tmp_path, tiny_labeler, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # Ctrl-C while the images are checked
        patch.setattr("training.train.check_images", interrupt)
        assert run.main(tiny_argv(tmp_path, tiny_labeler)) == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "state saved" not in err
    assert not (tmp_path / "run" / "train_state.pt").exists()

    with monkeypatch.context() as patch:  # Ctrl-C twice inside the first step: nothing to save yet
        patch.setattr(Trainer, "train_step", _sigint_during(Trainer.train_step, at_step=0, times=2))
        assert run.main(tiny_argv(tmp_path, tiny_labeler, "--steps", "3")) == 130
    assert "nothing was saved yet" in capsys.readouterr().err
    assert not (tmp_path / "run" / "train_state.pt").exists()

    with monkeypatch.context() as patch:  # Ctrl-C in the loop: the step finishes and is saved
        patch.setattr(Trainer, "train_step", _sigint_during(Trainer.train_step, at_step=0))
        assert run.main(tiny_argv(tmp_path, tiny_labeler, "--steps", "3")) == 130
    assert (f"state saved at step 1; continue with: python -m training.run --out {tmp_path / 'run'} "
            "--resume") in capsys.readouterr().err
    assert run.main(tiny_argv(tmp_path, tiny_labeler, "--steps", "3", "--resume")) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    capsys.readouterr()
    # A finished run resumed again, or with fewer steps: nothing trained and no file rewritten (a
    # smaller --steps must not become the recorded setting)
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()}
    for steps in ("3", "2"):
        assert run.main(tiny_argv(tmp_path, tiny_labeler, "--steps", steps, "--resume")) == 0
        assert f"already at step 3 of --steps {steps}: nothing to train" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").rglob("*") if f.is_file()} == before


def _sigint_during(train_step, at_step: int, times: int = 1):
    """Trainer.train_step that sends this process SIGINT `times` times in the middle of the step
    that starts at `at_step` (after its discriminator update, when the sampler has moved on)."""
    import signal

    def step(self):
        if self.step != at_step:
            return train_step(self)
        original = self.optims["discriminator"].step
        calls = []

        def d_step(*args, **kwargs):  # called twice a step (latent and reference targets)
            result = original(*args, **kwargs)
            if not calls:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
            calls.append(1)
            return result

        self.optims["discriminator"].step = d_step
        try:
            return train_step(self)
        finally:
            del self.optims["discriminator"].step
    return step


def test_ctrl_c_then_resume_continues_exactly(tmp_path, tiny_labeler, monkeypatch):
    """Ctrl-C lands in the middle of a step; the run finishes that step, saves it, and the resumed
    run ends with the weights of a run that was never interrupted."""
    straight = train(tiny_cfg(tmp_path / "a", tiny_labeler, steps=4), progress=False)
    cfg = tiny_cfg(tmp_path / "b", tiny_labeler, steps=4)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", _sigint_during(Trainer.train_step, at_step=1))
        with pytest.raises(TrainingInterrupted) as stopped:
            train(cfg, progress=False)
    assert stopped.value.step == 2
    with open(Path(cfg.out) / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "d_re')  # as if killed while logging: the resume drops the cut line
    resumed = train(cfg, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    wa = load_checkpoint(straight).generator.state_dict()
    wb = load_checkpoint(resumed).generator.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("setting, message", [
    ("log_every=-1", "log_every"), ("sample_every=-5", "sample_every"), ("save_every=-1", "save_every"),
    ("relabel_every=-1", "relabel_every"), ("num_style_z=0", "num_style_z"), ("topk=0", "topk"),
    ("max_minutes=-1", "max_minutes"), ("device=gpu", "device"), ("dl_image_size=0", "dl_image_size"),
    ("dl_image_size=100000", "between 32 and 1024"), ("compile_after=-1", "compile_after"),
    ("augment=blur", "augment must be one of resized-crop, shift, flip, got 'blur'"),
])
def test_cli_dry_run_rejects_bad_settings(setting, message, capsys):
    assert run.main(["--dry-run", "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_zero_periods_turn_periodic_work_off(tmp_path, tiny_labeler):
    cfg = tiny_cfg(tmp_path, tiny_labeler, stage=2, prompt_start=0, steps=1, log_every=0,
                   sample_every=0, save_every=0, relabel_every=0)
    out = train(cfg, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1]  # the last step is always logged
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000001.png"]
    assert load_checkpoint(out).metadata["step"] == 1


def test_a_new_run_refuses_a_folder_that_holds_a_run(tmp_path, tiny_labeler, capsys):
    from training.run_folder import RunError

    cfg = tiny_cfg(tmp_path, tiny_labeler, steps=1)
    out = Path(cfg.out)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # an attempt that died before its first save
    train(cfg, progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1]
    state = (out / "train_state.pt").read_bytes()
    with pytest.raises(RunError, match="--resume"):
        train(cfg, progress=False)
    argv = tiny_argv(tmp_path, tiny_labeler)
    assert run.main(argv) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert (out / "train_state.pt").read_bytes() == state


def test_a_run_kept_inside_its_data_folder_resumes_on_the_same_images(tmp_path, tiny_labeler):
    """`--data . --out runs/x`: the run's sample sheets are not data, so the resume finds the 12
    images it trained on, and a later run in the same data folder does not train on them either."""
    data = make_data(tmp_path / "data")
    cfg = tiny_cfg(tmp_path, tiny_labeler, data=str(data), out=str(data / "runs" / "a"), steps=2)
    out = train(cfg, progress=False)
    assert list((out / "samples").glob("*.png"))
    train(cfg.replace(steps=3), resume=True, progress=False)
    assert load_checkpoint(out).metadata["step"] == 3
    second = train(cfg.replace(out=str(data / "runs" / "b"), steps=1), progress=False)
    assert json.loads((second / "train_config.json").read_text())["num_images"] == 12


def test_a_resumed_stage_two_run_keeps_the_scores_of_its_learned_prompts(tmp_path, tiny_labeler):
    """Stage 2 relabels with the prompts it learns; the labels' scores (the reference style table's
    confident images, pseudo_labels_scores.json) must come back with them on --resume, not those of
    the first labelling."""
    cfg = tiny_cfg(tmp_path, tiny_labeler, stage=2, recipe="lanit-rt", prompt_start=1, prompt_lr=0.1,
                   relabel_every=1, steps=3, sample_every=10)
    out = train(cfg, progress=False)
    files = ("pseudo_labels.csv", "pseudo_labels_scores.json")
    saved = {name: (out / name).read_bytes() for name in files}
    model = _checkpoint_contents(out / "model.safetensors")  # its reference table reads the scores
    first = Trainer(cfg.replace(out=str(tmp_path / "fresh")), progress=False).scores
    trainer = Trainer(cfg, progress=False)
    trainer.resume()
    assert not torch.allclose(trainer.scores, first)  # the learned prompts moved the scores
    with pytest.raises(NothingToTrain):  # train() leaves a finished run alone ...
        train(cfg, resume=True, progress=False)
    trainer.run()  # ... the resumed trainer at its last step saves again and trains nothing
    assert {name: (out / name).read_bytes() for name in files} == saved
    metadata, tensors = _checkpoint_contents(out / "model.safetensors")
    assert metadata == model[0] and tensors.keys() == model[1].keys()
    assert all(torch.equal(tensors[key], model[1][key]) for key in tensors)


@pytest.mark.parametrize("recipe", ["lanit-official", "lanit-rt"])
def test_a_stage_two_run_resumes_exactly(tmp_path, tiny_labeler, recipe):
    """Stopped after step 3 of 5 and resumed, a stage-2 run (prompts learned from step 1, so their
    Adam state is part of what must come back) ends where the straight run does."""
    changes = dict(stage=2, recipe=recipe, prompt_start=1, prompt_lr=0.05, relabel_every=2,
                   sample_every=10, ds_decay_steps=5)
    straight = train(tiny_cfg(tmp_path / "a", tiny_labeler, steps=5, **changes), progress=False)
    half = tiny_cfg(tmp_path / "b", tiny_labeler, steps=3, **changes)
    train(half, progress=False)
    resumed = train(half.replace(steps=5), resume=True, progress=False)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5] and "g_dl_latent" in b[-1]
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith(("d_", "g_")):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    from safetensors.torch import load_file

    prompts_a, prompts_b = load_file(straight / "prompts.safetensors"), load_file(resumed / "prompts.safetensors")
    assert prompts_a.keys() == prompts_b.keys()
    assert all(torch.allclose(prompts_a[k], prompts_b[k], atol=1e-6) for k in prompts_a)


def _checkpoint_contents(file: Path) -> tuple[dict, dict]:
    """A safetensors file's header metadata and tensors (its header's key order varies between
    writes of the same content, so files are compared by content, not bytes)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as opened:
        return opened.metadata(), {key: opened.get_tensor(key) for key in opened.keys()}


def test_a_dl_image_size_the_labeler_cannot_take_stops_before_training(tmp_path, tiny_labeler):
    """The tiny labeler is a ViT (32 px, 8-px patches): other sizes fail in its position embedding.
    Without the check, that failure came as a traceback when the domain loss first ran."""
    from lanit_rt.config import ConfigError

    cfg = tiny_cfg(tmp_path, tiny_labeler, stage=2, prompt_start=1, steps=2, dl_image_size=64)
    with pytest.raises(ConfigError, match=r"^dl_image_size=64: the labeler .*tiny\S* cannot encode 64-px "
                                          r"images \(RuntimeError: .*\); unset it to use its own 32 px$"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "train_state.pt").exists()
    out = train(cfg.replace(dl_image_size=32), progress=False)  # its own size is fine
    assert "g_dl_latent" in read_metrics(out)[-1]


def test_resume_needs_only_the_run_folder(tmp_path, tiny_labeler, monkeypatch, capsys):
    """The run's settings come from its train_config.json; its relative --data is found from the
    folder the run was started in, as training.eval finds it."""
    argv = tiny_argv(tmp_path, tiny_labeler)
    make_data(tmp_path / "data")
    argv[argv.index("--data") + 1], argv[argv.index("--out") + 1] = "data", "runs/own"
    monkeypatch.chdir(tmp_path)
    assert run.main(argv + ["--set", "lr=3e-4", "--set", "lambda_id=2"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = str(tmp_path / "runs" / "own")
    capsys.readouterr()
    assert run.main(["--out", out, "--resume", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["data"] == str(tmp_path / "data") and shown["domains"] == list(DOMAINS)
    assert (shown["lr"], shown["lambda_id"], shown["steps"], shown["out"]) == (3e-4, 2.0, 1, out)
    assert run.main(["--out", out, "--resume", "--steps", "2", "--no-progress"]) == 0
    assert load_checkpoint(out).metadata["step"] == 2
    # The embedded data's run keeps domains None in its state and spells them out in
    # train_config.json; the model's domains are what is compared.
    state = torch.load(Path(out) / "train_state.pt", weights_only=True)
    state["train_config"]["domains"] = None
    torch.save(state, Path(out) / "train_state.pt")
    assert run.main(["--out", out, "--resume", "--steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert run.main(["--out", out, "--resume", "--steps", "4", "--set", "lr=5", "--no-progress"]) == 2
    assert "other settings (lr 0.0003 -> 5.0)" in capsys.readouterr().err
    record = tmp_path / "runs" / "own" / "train_config.json"
    settings = json.loads(record.read_text())
    (tmp_path / "data").rename(tmp_path / "moved")  # the recorded folder is gone: --data names the new one
    assert run.main(["--out", out, "--resume", "--dry-run"]) == 2
    assert f"the run's data folder '{tmp_path / 'data'}'" in capsys.readouterr().err  # as resumed above
    assert run.main(["--out", out, "--resume", "--dry-run", "--data", str(tmp_path / "moved")]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == str(tmp_path / "moved")
    record.write_text(json.dumps({**settings, "a_newer_setting": 1}))  # from another version
    assert run.main(["--out", out, "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "has settings this lanit-rt does not know (a_newer_setting)" in capsys.readouterr().err
    record.write_text("[1, 2]")
    assert run.main(["--out", out, "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "train_config.json holds a JSON list, not the run's settings" in capsys.readouterr().err


def test_a_data_run_without_out_goes_to_runs_and_the_data_folders_name(tmp_path, tiny_labeler,
                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(tmp_path, tiny_labeler)
    del argv[argv.index("--out"):argv.index("--out") + 2]
    assert run.main(argv) == 0
    assert load_checkpoint(tmp_path / "runs" / "data").metadata["step"] == 1  # the data: tmp_path/data
    capsys.readouterr()
    assert run.main(argv + ["--resume", "--dry-run"]) == 0  # --resume finds it the same way
    assert json.loads(capsys.readouterr().out)["out"] == "runs/data"


def test_resume_with_other_data_or_domains_fails_before_writing(tmp_path, tiny_labeler):
    from lanit_rt.checkpoint import CheckpointError

    cfg = tiny_cfg(tmp_path, tiny_labeler, max_minutes=0.0)  # saves at step 0: no training needed
    out = train(cfg, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    more = make_data(tmp_path / "more", n=13)
    with pytest.raises(CheckpointError, match="12 images, but .* has 13"):
        train(cfg.replace(data=str(more)), resume=True, progress=False)
    with pytest.raises(CheckpointError, match="domains"):
        train(cfg.replace(domains=("red", "green", "yellow")), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"other settings \(lr 0.0001 -> 5.0; label_mode 'topk' -> "
                                              r"'adaptive'\); a resumed run keeps its settings except steps"):
        train(cfg.replace(lr=5.0, label_mode="adaptive"), resume=True, progress=False)
    other = make_data(tmp_path / "other")  # the same 12 images, one of them replaced
    (other / "img_05.png").unlink()
    Image.new("RGB", (40, 40), "white").save(other / "img_05b.png")
    with pytest.raises(CheckpointError, match="other images"):
        train(cfg.replace(data=str(other)), resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(CheckpointError, match="no resume state"):
        train(cfg.replace(out=str(tmp_path / "new")), resume=True, progress=False)
    assert not (tmp_path / "new").exists()
    state_file = out / "train_state.pt"  # a state saved before the identity term existed
    state = torch.load(state_file, weights_only=True)
    del state["train_config"]["lambda_id"]
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"other settings \(lambda_id 0.0 -> 2.0\)"):
        train(cfg.replace(lambda_id=2.0), resume=True, progress=False)
    del state["train_config"]["augment"]  # and before the augmentation could be chosen: crops
    torch.save(state, state_file)
    with pytest.raises(CheckpointError, match=r"other settings \(augment 'resized-crop' -> 'shift'\)"):
        train(cfg.replace(augment="shift"), resume=True, progress=False)
    moved = make_data(tmp_path / "moved")  # the same files in another folder do resume
    train(cfg.replace(data=str(moved), steps=1, max_minutes=None), resume=True, progress=False)
    assert load_checkpoint(out).metadata["step"] == 1


def test_a_failed_save_names_the_file_and_keeps_the_previous_one(tmp_path, tiny_labeler, monkeypatch,
                                                                 capsys):
    from training.run_folder import RunError

    cfg = tiny_cfg(tmp_path, tiny_labeler, max_minutes=0.0)  # saves at step 0: no training needed
    out = train(cfg, progress=False)
    saved = (out / "train_state.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 truncated")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match=r"could not save .*train_state\.pt .*unexpected pos.*intact"):
        train(cfg, resume=True, progress=False)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert (out / "train_state.pt").read_bytes() == saved
    assert run.main(tiny_argv(tmp_path, tiny_labeler, "--resume", "--set", "max_minutes=0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not save") and len(err.strip().splitlines()) == 1


def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, tiny_labeler, monkeypatch, capsys):
    from training.distributed import cuda_index, init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        init_distributed("cuda")
    assert run.main(tiny_argv(tmp_path, tiny_labeler, "--set", "device=cuda:0")) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    # With GPUs, every CUDA device gets an explicit index (set_device rejects a bare "cuda").
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cuda_index("cuda", None) == 0 and cuda_index("auto", None) == 0
    assert cuda_index("cuda:1", None) == 1 and cuda_index("cuda", 1) == 1
    with pytest.raises(ConfigError, match="cuda:2 does not exist"):
        cuda_index("cuda:2", None)


def test_a_format_one_resume_state_is_refused_with_what_to_do(tmp_path):
    from types import SimpleNamespace

    from lanit_rt import CheckpointError

    trainer = SimpleNamespace(out=tmp_path / "run")  # the check reads only the run folder
    with pytest.raises(CheckpointError, match=r"'lanit-rt/1' checkpoint .* retrain it"):
        Trainer.check_resume_state(trainer, {"step": 3, "model_config": {}})  # format 1: no key


def test_phase_clock_charges_time_to_the_innermost_phase(monkeypatch):
    from training import train as train_module

    now = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(now))
    clock = train_module.PhaseClock(enabled=True)
    with clock("outer"):  # enters at 0
        with clock("inner"):  # 1 .. 3
            pass
        with clock("inner"):  # 6 .. 10
            pass
    # outer: 0-1, 3-6 and 10-15; inner: 1-3 and 6-10; together the whole 15
    assert clock.totals == {"outer": 9.0, "inner": 6.0}
    off = train_module.PhaseClock()
    with off("anything"):
        pass
    assert off.totals == {}


def test_lazy_r1_runs_the_penalty_every_kth_step_only(tmp_path, tiny_labeler):
    out = train(tiny_cfg(tmp_path, tiny_labeler, r1_every=2), progress=False)
    records = read_metrics(out)
    assert [("d_r1_latent" in r, "d_r1_ref" in r) for r in records] == [
        (True, True), (False, False), (True, True), (False, False)]


def test_the_run_ends_with_a_quality_table(tmp_path, tiny_labeler, capsys):
    data = make_data(tmp_path / "data")
    argv = ["--data", str(data), "--domains", ",".join(DOMAINS), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "3", "--labeler", tiny_labeler, "--no-progress"]
    for key, value in (("base_dim", 8), ("max_dim", 16), ("style_dim", 8), ("latent_dim", 4),
                       ("mapping_dim", 16), ("num_style_z", 8), ("label_mode", "topk"),
                       ("template_set", "face"), ("cache_dir", tmp_path / "cache")):
        argv += ["--set", f"{key}={value}"]
    assert run.main(argv + ["--eval"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    mean = result["translation"]["mean"]
    assert "| translations |" in printed and "| untranslated sources |" in printed
    assert (f"| translations | {mean['domain_accuracy']:.3f} | {mean['top1_accuracy']:.3f} | "
            f"{mean['content']:.3f} | {mean['fd']:.4f} |") in printed
    real = result["translation"]["real_mean"]
    assert (f"| real images of the target | {real['domain_accuracy']:.3f} | {real['top1_accuracy']:.3f} "
            "| - | - | - |") in printed
    assert run.main(argv + ["--out", str(tmp_path / "run2")]) == 0  # --data runs: off by default
    assert "python -m training.eval" in capsys.readouterr().out
    assert not (tmp_path / "run2" / "eval.json").exists()


def test_freezing_the_nets_a_step_does_not_update_leaves_its_gradients_unchanged():
    from lanit_rt.config import LanitConfig
    from training.train import build_nets, grads_only_for

    config = LanitConfig(domains=DOMAINS, img_size=32, base_dim=8, max_dim=16, style_dim=8,
                         latent_dim=4, mapping_dim=16)
    torch.manual_seed(0)
    nets, _ = build_nets(config, torch.device("cpu"))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.eye(3)[:2]

    def generator_grads(names):
        for net in nets.modules().values():
            net.zero_grad(set_to_none=True)
        with grads_only_for(nets, names):
            fake = nets.generator(x, nets.style_encoder(x.flip(0), y))
            (nets.discriminator(fake).sum() + nets.style_encoder(fake, y).abs().mean()).backward()
        return {n: p.grad.clone() for n, p in nets.generator.named_parameters()}

    everything = generator_grads(tuple(nets.modules()))
    assert all(p.grad is not None for p in nets.discriminator.parameters())
    alone = generator_grads(("generator",))
    assert all(torch.equal(everything[n], alone[n]) for n in everything)
    assert all(p.grad is None for p in nets.discriminator.parameters())
    assert all(p.grad is None for p in nets.style_encoder.parameters())
    assert all(p.requires_grad for net in nets.modules().values() for p in net.parameters())


def _plain_step(trainer: Trainer, lambda_id: float = 0.0) -> None:
    """The released LANIT / StarGAN v2 iteration written pass by pass, as the official code runs it:
    D on reals and on a latent fake, D on reals and on a reference fake, then the latent G step (G,
    F and E updated) and the reference G step (G only), then the EMA, then (stage 2) relabelling.
    Each recipe's own terms are written out here, not taken from the trainer's routing:
    - lanit-official: adversarial BCE over active (sample, domain) pairs, R1 on the summed active
      logits, diversity in the latent step only; once prompts are learned, -log relu(cos) of the
      removed domain in the latent step;
    - lanit-rt: both averaged per sample, diversity in both steps, and the two-sided BCE domain
      loss against an ablated target in both steps whenever there is a labeler.
    `lambda_id`: our identity term in the latent step, the sources rendered in a latent style of
    their own domains."""
    from lanit_rt.style import mix_styles
    from training import losses
    from training.train import every

    nets, cfg, optims, labeler = trainer.nets, trainer.cfg, trainer.optims, trainer.labeler
    official = cfg.recipe == "lanit-official"
    average = "pairs" if official else "samples"
    learn_prompts = trainer.prompt_optim is not None and trainer.step >= cfg.prompt_start_step
    x_real, x_ref, x_ref2, y_org, y_trg, y_abl, removed, z1, z2 = trainer._batch()
    r1_weight = losses.lazy_r1_weight(trainer.step, cfg.lambda_r1, cfg.r1_every)
    for make_style in (lambda: nets.mapping(z1, y_trg), lambda: nets.style_encoder(x_ref, y_trg)):
        with torch.no_grad():
            x_fake = nets.generator(x_real, make_style())
        x_in = x_real.detach().requires_grad_(True)
        out_real = nets.discriminator(x_in)
        loss = (losses.adversarial_loss(out_real, y_org, real=True, average=average)
                + losses.adversarial_loss(nets.discriminator(x_fake), y_trg, real=False, average=average))
        if r1_weight > 0:
            score = "sum" if official else "mean"
            loss = loss + r1_weight * losses.r1_penalty(out_real, y_org, x_in, score=score)
        optims["discriminator"].zero_grad()
        loss.backward()
        optims["discriminator"].step()
    lambda_ds = losses.diversity_weight(trainer.step, cfg.lambda_ds, cfg.ds_decay_span)
    for latent in (True, False):
        if latent:
            style, second_style = (lambda y: nets.mapping(z1, y)), (lambda y: nets.mapping(z2, y))
            s_trg, s_org = style(y_trg), nets.style_encoder(x_real, y_org)
        else:
            style, second_style = (lambda y: nets.style_encoder(x_ref, y)), (lambda y: nets.style_encoder(x_ref2, y))
            # E is not trained in this step: the references' and the sources' styles without
            # gradients, in one call as the trainer makes them (E has no batch statistics).
            # lanit-rt's diversity term here compares two nearly equal translations, whose L1 signs
            # would show the rounding of another batch size or of a pass with gradients.
            with torch.no_grad():
                ref_styles, own_styles = nets.style_encoder.all_styles(torch.cat([x_ref, x_real])).chunk(2)
            s_trg, s_org = mix_styles(ref_styles, y_trg), mix_styles(own_styles, y_org)
        x_fake = nets.generator(x_real, s_trg)
        loss = (losses.adversarial_loss(nets.discriminator(x_fake), y_trg, real=True, average=average)
                + cfg.lambda_sty * (nets.style_encoder(x_fake, y_trg) - s_trg).abs().mean())
        if latent or not official:
            with torch.no_grad():
                x_fake2 = nets.generator(x_real, second_style(y_trg))
            loss = loss - lambda_ds * (x_fake - x_fake2).abs().mean()
        if latent and lambda_id:
            x_id = nets.generator(x_real, nets.mapping(z1, y_org))
            loss = loss + lambda_id * (x_id - x_real).abs().mean()
        x_rec = nets.generator(x_fake, s_org)
        loss = loss + cfg.lambda_cyc * (x_rec - x_real).abs().mean()
        if labeler is not None and cfg.lambda_dl > 0:
            if official and latent and learn_prompts:
                cosines = labeler.scores(x_fake, True, relative=False)
                loss = loss + cfg.lambda_dl * losses.removed_domain_loss(cosines, removed)
            elif not official:
                x_abl = nets.generator(x_real, style(y_abl))
                scores = labeler.scores(torch.cat([x_fake, x_abl]), learn_prompts)
                n = len(x_real)
                loss = loss + cfg.lambda_dl * losses.domain_regularization_loss(
                    scores[:n], y_trg, scores[n:], removed, scale=float(labeler.vl.logit_scale))
        for optim in optims.values():
            optim.zero_grad()
        if learn_prompts:
            trainer.prompt_optim.zero_grad()
        loss.backward()
        for name in ("generator", "mapping", "style_encoder") if latent else ("generator",):
            optims[name].step()
        if learn_prompts:
            trainer.prompt_optim.step()
    # the EMA written out: ema + (1 - beta) (p - ema)
    beta = losses.ema_beta(trainer.step, cfg.ema_beta)
    with torch.no_grad():
        for name, ema_net in trainer.ema.modules().items():
            for p_ema, p in zip(ema_net.parameters(), nets.modules()[name].parameters()):
                p_ema.add_((1 - beta) * (p - p_ema))
    trainer.step += 1
    if learn_prompts and every(trainer.step, cfg.relabel_every):
        trainer.labels, trainer.scores = labeler.label()
        trainer.pool = trainer._active_pool()


@pytest.mark.parametrize("recipe, stage, lambda_id, lambda_ds", [
    ("lanit-official", 1, 0.0, 1.0), ("lanit-official", 1, 2.0, 1.0), ("lanit-rt", 1, 0.0, 0.0),
    ("lanit-official", 2, 0.0, 0.0), ("lanit-rt", 2, 0.0, 0.0),
])
def test_the_training_step_is_the_official_iteration(tmp_path, tiny_labeler, recipe, stage, lambda_id,
                                                     lambda_ds):
    """The trainer's step shares passes (one content pass for every fake, reals and fakes in one D
    pass, the reference step's styles without gradients) but must update every net (and, in stage
    2, the prompts and the labels) as the plain iteration does, for each recipe (with the identity
    term written as its own G call where it is on). SGD instead of Adam, so a difference in any
    gradient shows. Noise images and each step started from the same weights on both sides: on
    flat colours, the L1 terms' signs at tied pixels and instance norm turn float rounding into
    visible differences. The diversity term compares two translations that the lanit-rt init and
    stage 2's prompt steps leave nearly equal, so its L1 signs flip with the rounding of a batched
    pass: it is checked in the official stage-1 cases, and off in the others (the lanit-rt
    reference step's own diversity target has a test of its own below)."""
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    cfg = tiny_cfg(tmp_path, tiny_labeler, r1_every=2, steps=10, data=str(folder), lambda_id=lambda_id,
                   recipe=recipe, stage=stage, prompt_start=1, relabel_every=2, lambda_ds=lambda_ds)
    fast, plain = (Trainer(cfg, progress=False) for _ in range(2))
    start = {name: {k: v.clone() for k, v in net.state_dict().items()}
             for name, net in fast.nets.modules().items()}
    for trainer in (fast, plain):
        trainer.optims = {name: torch.optim.SGD(net.parameters(), lr=0.05)
                          for name, net in trainer.nets.modules().items()}
        if stage == 2:
            trainer.prompt_optim = torch.optim.SGD(trainer.prompt_optim.param_groups[0]["params"], lr=0.5)
        # lanit-rt: multi-hot targets, where its per-sample averages differ from the official ones
        # over (sample, domain) pairs (one-hot targets elsewhere: with them, the official cases'
        # near-tied L1 terms stay clear of the 2-thread rounding of the batched passes)
        trainer.labels = (torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1.0]]).repeat(2, 1)
                          if recipe == "lanit-rt" else torch.eye(3)[torch.arange(12) % 3])
    prompts_start = fast.labeler.prompt_bank.state_dict() if stage == 2 else None
    prompts_start = {k: v.clone() for k, v in prompts_start.items()} if prompts_start else None
    for step in range(3):  # steps 0 and 2 with R1, step 1 without; prompts learned from step 1
        logs = fast.train_step()
        assert ("g_id_latent" in logs) == (lambda_id > 0) and "g_id_ref" not in logs
        assert ("g_dl_ref" in logs) == (recipe == "lanit-rt" and fast.labeler is not None)
        _plain_step(plain, lambda_id)
        pairs = [(fast.nets, plain.nets), (fast.ema, plain.ema)]
        for nets, other in pairs:
            for name, net in nets.modules().items():
                for (key, a), b in zip(net.state_dict().items(), other.modules()[name].state_dict().values()):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"step {step}: {name}.{key}")
                other.modules()[name].load_state_dict(net.state_dict())
        if stage == 2:
            banks = fast.labeler.prompt_bank, plain.labeler.prompt_bank
            for (key, a), b in zip(banks[0].state_dict().items(), banks[1].state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"step {step}: prompts {key}")
            banks[1].load_state_dict(banks[0].state_dict())
            assert torch.equal(fast.labels, plain.labels)
    moved = [not torch.equal(p, start["generator"][k]) for k, p in fast.nets.generator.state_dict().items()]
    assert sum(moved) > 10  # the comparison is between trained nets
    if stage == 2:  # and the prompts were learned
        assert any(not torch.equal(v, prompts_start[k]) for k, v in fast.labeler.prompt_bank.state_dict().items())


@pytest.mark.parametrize("recipe, average, score", [("lanit-official", "pairs", "sum"),
                                                     ("lanit-rt", "samples", "mean")])
def test_the_discriminator_objective_follows_the_recipe(tiny_config, recipe, average, score):
    """Each recipe's averaging of the adversarial BCE and reduction of R1's score, on multi-hot
    targets (with one domain a sample, pairs and samples, sums and means agree)."""
    from lanit_rt import Discriminator, Generator, MappingNetwork, StyleEncoder
    from training import losses
    from training.train import Nets, discriminator_step

    nets = Nets(Generator(tiny_config), MappingNetwork(tiny_config), StyleEncoder(tiny_config),
                Discriminator(tiny_config))
    gen = torch.Generator().manual_seed(0)
    size = tiny_config.img_size
    x_real, x_fake = (torch.randn(4, 3, size, size, generator=gen) for _ in range(2))
    y_org = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1.0]])
    y_trg = torch.tensor([[0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 1.0]])
    _, logs = discriminator_step(nets, x_real, y_org, y_trg, x_fake, TrainConfig(recipe=recipe), 1.0)
    x_in = x_real.clone().requires_grad_(True)
    out_real, out_fake = nets.discriminator(x_in), nets.discriminator(x_fake)
    assert logs["d_real"] == pytest.approx(losses.adversarial_loss(out_real, y_org, real=True, average=average).item())
    assert logs["d_fake"] == pytest.approx(losses.adversarial_loss(out_fake, y_trg, real=False, average=average).item())
    assert logs["d_r1"] == pytest.approx(losses.r1_penalty(out_real, y_org, x_in, score=score).item(), rel=1e-5)
    other = "mean" if score == "sum" else "sum"  # the other reduction gives another figure here
    assert logs["d_r1"] != pytest.approx(losses.r1_penalty(out_real, y_org, x_in, score=other).item(), rel=1e-3)


def test_lanit_rt_reference_step_diversity_uses_the_generator_the_latent_step_left(tmp_path, tiny_labeler,
                                                                                  monkeypatch):
    """lanit-rt's reference step pushes its translation away from a second one in another reference's
    style, made with G as the latent step left it (it was once made before that step, with the G the
    step started from)."""
    from training import losses

    cfg = tiny_cfg(tmp_path, tiny_labeler, recipe="lanit-rt", steps=10)
    trainer = Trainer(cfg, progress=False)
    batch = Trainer(cfg, progress=False)._batch()  # the batch the trainer's first step draws
    seen = []
    diversity = losses.diversity_loss

    def recording(fake, fake2):
        seen.append((fake2.detach().clone(), {k: v.clone() for k, v in trainer.nets.generator.state_dict().items()}))
        return diversity(fake, fake2)

    monkeypatch.setattr(losses, "diversity_loss", recording)
    trainer.train_step()
    assert len(seen) == 2  # the latent and the reference step
    fake2, generator_then = seen[1]
    x_real, _, x_ref2, _, y_trg = batch[:5]
    replay = Trainer(cfg, progress=False)
    replay.nets.generator.load_state_dict(generator_then)
    replay.nets.style_encoder.load_state_dict(trainer.nets.style_encoder.state_dict())  # E: as left
    with torch.no_grad():
        expected = replay.nets.generator(x_real, replay.nets.style_encoder(x_ref2, y_trg))
    torch.testing.assert_close(fake2, expected, rtol=0, atol=1e-6)
    assert not all(torch.equal(generator_then[k], v) for k, v in  # the latent step did move G
                   Trainer(cfg, progress=False).nets.generator.state_dict().items())


def test_compile_resolution_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert should_compile(True, cuda, 2, 4) and not should_compile(False, cpu, 10**6, 1)
    assert should_compile(None, cpu, COMPILE_MIN_STEPS, 1)
    assert not should_compile(None, cpu, COMPILE_MIN_STEPS - 1, 1)  # a compile would not pay
    assert not should_compile(None, cpu, 10**6, 2)  # torchrun: untested, eager
    assert not should_compile(None, cuda, 10**6, 1)  # GPUs: unmeasured, eager
    assert TrainConfig().compile is None and TrainConfig(compile=False).compile is False


FREED_MEMORY_PROBE = """
import json, os, torch
from training.acceleration import keep_freed_memory, release_freed_memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def touch_and_free():  # a 64 MiB block, every page written, then freed
    block = torch.ones(64 * 2**20 // 4)
    del block
    return rss_mib() - base

base = rss_mib()
defaults = touch_and_free()
kept = keep_freed_memory()
while_kept = touch_and_free()
released = release_freed_memory()
print(json.dumps([defaults, kept, while_kept, released, rss_mib() - base, touch_and_free()]))
"""


def test_freed_memory_is_kept_while_training_and_handed_back_after():
    import platform

    if platform.libc_ver()[0] != "glibc":
        assert keep_freed_memory() is False and release_freed_memory() is False
        return
    # A fresh process: in this one, earlier tests may have left free holes in the heap that a
    # 64 MiB block fits into, and glibc reuses those whatever its thresholds.
    done = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True,
                          cwd=REPO, check=True)
    defaults, kept, while_kept, released, after, defaults_again = json.loads(done.stdout)
    assert defaults < 16  # glibc's defaults: a block this big is unmapped when freed
    assert kept is True and while_kept > 48  # kept in the heap for the next step
    assert released is True and after < 16  # handed back
    assert defaults_again < 16  # and glibc's defaults are back


def test_compiled_training_matches_eager_training(tmp_path, tiny_labeler, monkeypatch):
    import training.train as train_module

    batching, original = [], train_module.batched_kernel_builds

    def batched_kernel_builds():  # the compiled run builds inductor's kernels per graph
        batching.append(True)
        return original()

    monkeypatch.setattr(train_module, "batched_kernel_builds", batched_kernel_builds)
    eager = train(tiny_cfg(tmp_path / "a", tiny_labeler, steps=2, compile=False), progress=False)
    assert batching == []
    compiled = train(tiny_cfg(tmp_path / "b", tiny_labeler, steps=2, compile=True), progress=False)
    assert batching == [True]
    for ra, rb in zip(read_metrics(eager), read_metrics(compiled), strict=True):
        for key in ra:
            if key.startswith(("d_", "g_")):
                assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (ra["step"], key)
    a, b = load_checkpoint(eager), load_checkpoint(compiled)
    assert sorted(a.generator.state_dict()) == sorted(b.generator.state_dict())  # names kept
    # Adam turns rounding-level differences in near-zero gradients (biases before an instance
    # norm) into whole lr-sized steps, so compare what the nets compute, not each weight.
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    style = a.domain_style(torch.eye(3)[[0, 1, 2, 0]])
    with torch.no_grad():
        ya, yb = a.generator(x, style), b.generator(x, style)
    # Measured: 1e-3 apart after two steps, while one more step moves the output by ~0.17.
    assert (ya - yb).abs().max() < 0.01
    # A resumed run may turn compiling off (or on): the arithmetic is the same.
    more = tiny_cfg(tmp_path / "b", tiny_labeler, steps=3, compile=False)
    c = load_checkpoint(train(more, resume=True, progress=False))
    assert c.metadata["step"] == 3
    with torch.no_grad():
        assert (c.generator(x, style) - yb).abs().max() > 0.05  # the bound above is tight


def test_the_compile_probe_says_why_in_one_line(monkeypatch):
    from training.acceleration import compile_unusable_reason

    cpu = torch.device("cpu")
    assert compile_unusable_reason(cpu) is None  # this machine compiles (CI's too)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Compiler: g++ is not found\n(pages of build log)")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert compile_unusable_reason(cpu) == "RuntimeError: Compiler: g++ is not found"


def test_the_compile_probe_refuses_results_that_differ_from_eager_mode(monkeypatch):
    from training.acceleration import compile_unusable_reason

    compile_for_real = torch.compile

    def one_percent_off(fn, **options):  # a compile that builds and runs, but computes wrongly
        compiled = compile_for_real(fn, **options)
        return lambda x: compiled(x) * 1.01

    monkeypatch.setattr(torch, "compile", one_percent_off)
    assert compile_unusable_reason(torch.device("cpu")) == \
        "the compiled probe's results differ from eager mode's"


@pytest.mark.parametrize("setting", [None, True])
def test_a_broken_torch_compile_warns_or_fails_in_one_line(tmp_path, tiny_labeler, monkeypatch,
                                                             setting):
    import training.train as train_module

    monkeypatch.setattr(train_module, "probe_compile", lambda device: (False, "no C++ compiler"))
    monkeypatch.setattr(train_module, "should_compile", lambda *args: True)
    compiled = []
    monkeypatch.setattr(train_module, "compile_blocks", compiled.append)
    cfg = tiny_cfg(tmp_path, tiny_labeler, steps=1, compile=setting)
    if setting is None:
        with pytest.warns(UserWarning, match=r"without torch.compile.*no C\+\+ compiler"):
            train(cfg, progress=False)
    else:
        with pytest.raises(RunError, match=r"compile=true.*no C\+\+ compiler.*compile=false"):
            train(cfg, progress=False)
    assert compiled == []


def test_stage_1_frees_the_text_tower_it_no_longer_needs(tmp_path, tiny_labeler):
    from training.labeling.views import VisionLanguageError

    stage1 = Trainer(tiny_cfg(tmp_path / "a", tiny_labeler), progress=False)
    with pytest.raises(VisionLanguageError, match="the text tower was released"):
        stage1.labeler.vl.encode_texts(["a"])
    stage1.train_step()  # the DL loss needs the image tower only
    stage2 = Trainer(tiny_cfg(tmp_path / "b", tiny_labeler, stage=2), progress=False)
    assert stage2.labeler.vl.encode_texts(["a"]).shape[0] == 1  # it learns prompts: kept


class FakeChild:
    """training.background_compile.BackgroundCompile without a process: what the trainer asks of it
    goes to `events`; `result` is what it reports, `done` what done() answers."""

    events: list = []
    result_value = None
    done_value = True

    def __init__(self, model, calls, device, threads):
        self.events.append(("child", len(calls), sorted({c["block"] for c in calls}), threads))

    def done(self):
        return self.done_value() if callable(self.done_value) else self.done_value

    def result(self):
        self.events.append("result")
        return self.result_value

    def close(self):
        self.events.append("close")


@pytest.fixture
def eager_start(monkeypatch):
    """A run that would compile, with FakeChild for the child and compile_blocks noted in events;
    each step notes its number and the thread count it ran with. Two threads to start with."""
    import training.train as train_module
    from training.background_compile import CompileResult

    events = []
    child = type("Child", (FakeChild,), {"events": events,
                                         "result_value": CompileResult(batched=False, reason=None),
                                         "cached": None})
    monkeypatch.setattr(train_module, "BackgroundCompile", child)
    monkeypatch.setattr(train_module, "compiled_before", lambda *request: child.cached)
    monkeypatch.setattr(train_module, "should_compile", lambda *args: True)
    monkeypatch.setattr(train_module, "compile_blocks",
                        lambda blocks: events.append(("compile", torch.get_num_threads())))
    step = Trainer.train_step

    def noted_step(self):
        events.append(("step", self.step + 1, torch.get_num_threads()))
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", noted_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield child
    torch.set_num_threads(threads)


def test_a_cpu_run_trains_eagerly_on_one_thread_fewer_until_the_compile_after_step(
        tmp_path, tiny_labeler, eager_start):
    train(tiny_cfg(tmp_path, tiny_labeler, steps=4, compile_after=2), progress=False)
    blocks = ["generator.decode.0", "generator.decode.1", "generator.decode.2", "generator.encode.0",
              "generator.encode.1", "generator.encode.2", "generator.to_rgb", "style_encoder.trunk"]
    events = eager_start.events
    assert events[0] == ("step", 1, 1)
    kind, calls, named, threads = events[1]  # started after the first step, for a 2-thread trainer
    assert (kind, named, threads) == ("child", blocks, 2) and calls >= len(blocks)
    assert events[2:] == [("step", 2, 1), "result", "close", ("compile", 2), ("step", 3, 2),
                          ("step", 4, 2), "close"]
    assert torch.get_num_threads() == 2
    # Runs that end by compile_after, or start at it (resumed), compile before their first step.
    events.clear()
    train(tiny_cfg(tmp_path, tiny_labeler, steps=5, compile_after=4), resume=True, progress=False)
    assert events == [("compile", 2), ("step", 5, 2)]
    events.clear()
    train(tiny_cfg(tmp_path / "b", tiny_labeler, steps=2, compile_after=2), progress=False)
    assert events == [("compile", 2), ("step", 1, 2), ("step", 2, 2)]


def test_an_auto_compile_after_skips_the_eager_start_where_the_caches_hold_the_compile(
        tmp_path, tiny_labeler, eager_start, monkeypatch):
    """compile_after=auto: the compiled blocks take over after step 1 where a child compiled the
    same calls before, else at COMPILE_AFTER with a child; train_config.json and the saved state
    record the step it came to, and resuming keeps it."""
    import training.train as train_module
    from training.background_compile import CompileResult
    from training.run import resumed_settings

    monkeypatch.setattr(train_module, "COMPILE_AFTER", 2)
    train(tiny_cfg(tmp_path / "cold", tiny_labeler, steps=3), progress=False)
    assert eager_start.events[2:] == [("step", 2, 1), "result", "close", ("compile", 2), ("step", 3, 2),
                                      "close"]
    assert resumed_settings(tmp_path / "cold" / "run")["compile_after"] == 2
    eager_start.events.clear()
    eager_start.cached = CompileResult(batched=False, reason=None)
    cfg = tiny_cfg(tmp_path / "warm", tiny_labeler, steps=3)
    train(cfg, progress=False)
    assert eager_start.events == [("step", 1, 1), ("compile", 2), ("step", 2, 2), ("step", 3, 2)]
    assert resumed_settings(tmp_path / "warm" / "run")["compile_after"] == 1
    state = torch.load(tmp_path / "warm" / "run" / "train_state.pt", weights_only=False)
    assert state["train_config"]["compile_after"] == 1
    eager_start.events.clear()
    eager_start.cached = None  # resumed with the recorded step, past it: compiles first, no child
    train(cfg.replace(steps=4, compile_after=1), resume=True, progress=False)
    assert eager_start.events == [("compile", 2), ("step", 4, 2)]


@pytest.mark.parametrize("setting", [None, True])
def test_a_child_that_finds_compiling_broken_warns_or_fails_in_one_line(tmp_path, tiny_labeler,
                                                                         eager_start, setting):
    from training.background_compile import CompileResult

    eager_start.result_value = CompileResult(batched=False, reason="no C++ compiler")
    cfg = tiny_cfg(tmp_path, tiny_labeler, steps=3, compile_after=1, compile=setting)
    if setting is None:
        with pytest.warns(UserWarning, match=r"without torch.compile.*no C\+\+ compiler"):
            train(cfg, progress=False)
        assert eager_start.events[2:] == ["result", "close", ("step", 2, 2), ("step", 3, 2), "close"]
    else:
        with pytest.raises(RunError, match=r"compile=true.*no C\+\+ compiler.*compile=false"):
            train(cfg, progress=False)
        assert torch.get_num_threads() == 2
    assert not any(event[0] == "compile" for event in eager_start.events if isinstance(event, tuple))


@pytest.mark.parametrize("why", ["calls it cannot replay", "no process"])
def test_without_a_child_the_trainer_compiles_after_the_first_step(tmp_path, tiny_labeler, eager_start,
                                                                   monkeypatch, why):
    import contextlib

    import training.train as train_module
    from training.background_compile import Recording

    @contextlib.contextmanager
    def unsupported(blocks):
        yield Recording(unsupported="generator.encode.0: a block argument of type object")

    def no_process(*args):
        raise OSError("Resource temporarily unavailable")

    if why == "no process":
        monkeypatch.setattr(train_module, "BackgroundCompile", no_process)
    else:
        monkeypatch.setattr(train_module, "record_block_calls", unsupported)
    monkeypatch.setattr(train_module, "probe_compile", lambda device: (False, None))
    train(tiny_cfg(tmp_path, tiny_labeler, steps=3, compile_after=2), progress=False)
    assert eager_start.events == [("step", 1, 1), ("compile", 2), ("step", 2, 2), ("step", 3, 2)]


def test_ctrl_c_while_waiting_for_the_child_saves_the_steps_made(tmp_path, tiny_labeler, eager_start):
    import signal

    def ctrl_c():  # the child is still compiling when Ctrl-C comes
        signal.raise_signal(signal.SIGINT)
        return False

    eager_start.done_value = staticmethod(ctrl_c)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_cfg(tmp_path, tiny_labeler, steps=4, compile_after=2), progress=False)
    assert stopped.value.step == 2
    assert eager_start.events[2:] == [("step", 2, 1), "close"]
    assert torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)["step"] == 2


def test_ctrl_c_that_kills_the_compiler_is_a_stop_not_a_crash(tmp_path, tiny_labeler, monkeypatch,
                                                               capsys):
    """Ctrl-C goes to the whole process group, so the C++ compiler torch.compile runs during a
    step dies of it and the step raises a compile error: with a stop requested that is an
    interruption (the half-done step unsaved), without one the error itself."""
    import signal

    class CompileError(RuntimeError):
        pass

    def dying_compile(ctrl_c: bool):
        def step(self):  # the run's first step, where torch.compile compiles
            if ctrl_c:
                signal.raise_signal(signal.SIGINT)
            raise CompileError("C++ compile error")
        return step

    def as_if_compiled(self):
        self.compiled = True
        return True

    monkeypatch.setattr(Trainer, "compile_now", as_if_compiled)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", dying_compile(ctrl_c=True))
        assert run.main(tiny_argv(tmp_path, tiny_labeler, "--steps", "3")) == 130
    captured = capsys.readouterr()
    assert "Ctrl-C stopped torch.compile's C++ compiler in step 1" in captured.out
    assert "interrupted: nothing was saved yet" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "run" / "train_state.pt").exists()
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", dying_compile(ctrl_c=False))
        with pytest.raises(CompileError):
            train(tiny_cfg(tmp_path / "b", tiny_labeler, steps=3), progress=False)
