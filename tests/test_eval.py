"""`python -m training.eval` end to end on a tiny run folder built here, with a tiny random open_clip
labeler on disk (loaded through training.labeling.vl like any local checkpoint)."""

import copy
import csv
import json
import warnings
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lanit_rt import Generator, LanitConfig, MappingNetwork, StyleEncoder, save_checkpoint
from lanit_rt.style import latent_style_table
from training.evaluation import eval as lanit_eval
from training.evaluation import inputs as eval_inputs
from training.evaluation import report as eval_report
from training.evaluation import metrics
from training import run_folder

DOMAINS = ("red", "green", "blue")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
PER_DOMAIN = 8
TEMPLATES = ["a photo of a {} thing.", "a {} picture."]
CURVE_KEYS = ("d_real_latent", "g_adv_latent", "g_cyc_latent")


def _tiny_open_clip(folder: Path) -> Path:
    """A random 1-layer open_clip CLIP saved as an open_clip model folder (config + safetensors)."""
    import open_clip

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True)
    torch.manual_seed(123)
    model = open_clip.model.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    data = root / "data"
    gt_rows = []
    for name in DOMAINS:
        (data / name).mkdir(parents=True)
        for i in range(PER_DOMAIN):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (40, 40, 3)), 0, 255)
            path = data / name / f"{name}_{i}.png"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            gt_rows.append((path, name))
    gt_csv = root / "gt.csv"
    with open(gt_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *DOMAINS])
        for path, name in gt_rows:  # relative to the CSV's folder
            writer.writerow([str(path.relative_to(root)), *[int(d == name) for d in DOMAINS]])

    vl_dir = _tiny_open_clip(root / "tiny_clip")
    run = root / "run"
    config = LanitConfig(domains=DOMAINS, img_size=32, base_dim=8, max_dim=32, style_dim=16,
                         latent_dim=8, mapping_dim=32)
    torch.manual_seed(0)
    generator, mapping, style_encoder = Generator(config), MappingNetwork(config), StyleEncoder(config)
    save_checkpoint(run, config, generator, mapping, style_encoder,
                    latent_table=latent_style_table(mapping, num_z=64), metadata={"step": 40, "stage": 2})
    (run / "train_config.json").write_text(json.dumps({
        "data": str(data), "domains": list(DOMAINS), "labeler": str(vl_dir), "templates": TEMPLATES,
        "label_mode": "adaptive", "topk": 1, "threshold": 0.0, "base_prompt": None, "stage": 2,
        "img_size": 32, "cache_dir": str(root / "cache")}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in (10, 20, 30, 40):
            f.write(json.dumps({"step": step, "time": step / 10, **{k: 1.0 / step + i for i, k in
                                                                  enumerate(CURVE_KEYS)}}) + "\n")
    # The trainer's labels: right for red and green, "blue" never on -> blue F1 0, macro F1 2/3.
    with open(run / "pseudo_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *DOMAINS])
        for path, name in gt_rows:
            writer.writerow([str(path), int(name == "red"), int(name == "green"), 0])
    # Learned prompts: the stage-1 context moved a little.
    from training.labeling.prompts import PromptBank
    from training.labeling.vl import load_vision_language

    vl = load_vision_language(str(vl_dir))
    bank = PromptBank(vl, list(DOMAINS), templates=TEMPLATES, learnable=True)
    context = bank.state_dict()["context"]
    noise = torch.randn(context.shape, generator=torch.Generator().manual_seed(1))
    save_file({"context": context + 0.5 * noise}, str(run / "prompts.safetensors"))

    argv = [str(run), "--gt", str(gt_csv), "--n", "6", "--seed", "3", "--no-progress",
            "--cache-dir", str(root / "cache"), "--batch-size", "16"]
    assert lanit_eval.main(argv) == 0
    result = json.loads((run / "eval.json").read_text())
    return {"root": root, "run": run, "gt": gt_csv, "data": data, "vl": vl, "argv": argv,
            "result": result, "bank": bank}


def test_eval_writes_every_output(run_dir):
    run, result = run_dir["run"], run_dir["result"]
    for name in ("eval.json", "eval.md", "eval_samples.png", "eval_curves.png"):
        assert (run / name).is_file(), name
    assert result["domains"] == list(DOMAINS)
    assert result["num_images"] == 3 * PER_DOMAIN
    assert result["labeler"] == str(run_dir["root"] / "tiny_clip")
    assert sorted(result["curves"]) == sorted(CURVE_KEYS)
    # Sample sheet: 6 source rows; columns source + 3 domains + 2 pairs, 64 px cells, 2 px gaps.
    with Image.open(run / "eval_samples.png") as sheet:
        assert sheet.size == (2 + 6 * 66, 28 + 6 * 66 + 2)
    assert result["samples"]["columns"][:4] == ["source", *DOMAINS]
    assert len(result["samples"]["columns"]) == 6 and " + " in result["samples"]["columns"][4]
    with Image.open(run / "eval_curves.png") as curves:
        assert curves.size == (900, 170)  # 3 curves, 3 panels per row
    md = (run / "eval.md").read_text()
    assert "mean (mFD, mKID)" in md and "| learned |" in md and "| stage1 |" in md


def test_out_writes_the_report_elsewhere_and_leaves_the_runs_own(run_dir, tmp_path, capsys):
    """--out DIR takes the four files; the run folder's (training's closing evaluation) stay."""
    run = run_dir["run"]
    before = {name: (run / name).read_bytes() for name in eval_inputs.OUTPUT_FILES if (run / name).exists()}
    assert "eval.json" in before
    out = tmp_path / "quick" / "eval"
    assert lanit_eval.main([*run_dir["argv"], "--out", str(out)]) == 0
    assert f"wrote {out / 'eval.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(eval_inputs.OUTPUT_FILES)
    assert json.loads((out / "eval.json").read_text())["summary"] == run_dir["result"]["summary"]
    assert {name: (run / name).read_bytes() for name in before} == before
    (tmp_path / "afile").write_text("")
    assert lanit_eval.main([*run_dir["argv"], "--out", str(tmp_path / "afile" / "x")]) == 1
    assert "cannot write the evaluation into --out" in capsys.readouterr().err


def test_reports_say_how_many_sources_each_target_had(run_dir):
    """A data set with few images outside a target translates fewer sources than --n: the report
    and the closing table say so instead of quoting --n."""
    result = copy.deepcopy(run_dir["result"])
    assert "n = 6 translations per domain" in eval_report.markdown_report(result)
    result["settings"]["n"] = 50
    note = "6 (fewer than the n = 50 asked: only that many images lie outside the target)"
    assert f"{note} translations per domain" in eval_report.markdown_report(result)
    assert f"{note} sources per domain" in eval_report.headline_table(result)
    result["translation"]["per_domain"]["red"]["num_translated"] = 4
    assert eval_report.markdown_report(result).count("4-6 (fewer than the n = 50 asked") == 1


def test_trainer_labels_scored_against_ground_truth(run_dir):
    labels = run_dir["result"]["pseudo_labels"]
    trainer = labels["trainer"]
    assert trainer["per_domain"]["red"]["f1"] == 1.0
    assert trainer["per_domain"]["green"]["f1"] == 1.0
    assert trainer["per_domain"]["blue"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                             "support": PER_DOMAIN, "predicted": 0}
    assert trainer["macro_f1"] == pytest.approx(2 / 3)
    assert labels["ground_truth"]["positives"] == {d: PER_DOMAIN for d in DOMAINS}
    for prompts in ("stage1", "learned"):
        for mode in eval_inputs.MODES:
            f1 = labels[prompts][mode]["macro_f1"]
            assert 0.0 <= f1 <= 1.0
    # top-1 labels exactly one domain per image: predicted counts sum to the image count.
    top = labels["stage1"]["topk"]["per_domain"]
    assert sum(v["predicted"] for v in top.values()) == 3 * PER_DOMAIN


def test_pseudo_label_quality_matches_direct_computation(run_dir):
    """Stage-1 and learned-prompt F1 equal labelling the images ourselves with the same pieces."""
    from training.labeling.prompts import PromptBank
    from training.labeling.pseudo_labels import image_features, pseudo_labels

    vl, result = run_dir["vl"], run_dir["result"]
    paths = sorted(run_dir["data"].rglob("*.png"))
    gt = torch.tensor([[float(p.parent.name == d) for d in DOMAINS] for p in paths])
    feats = image_features(vl, paths, None, progress=False)
    learned = PromptBank(vl, list(DOMAINS), templates=TEMPLATES, learnable=True)
    from safetensors.torch import load_file
    learned.load_state_dict(load_file(str(run_dir["run"] / "prompts.safetensors")))
    banks = {"stage1": PromptBank(vl, list(DOMAINS), templates=TEMPLATES), "learned": learned}
    for name, bank in banks.items():
        with torch.no_grad():
            domain_feats, base = bank()
        labels, _ = pseudo_labels(feats, domain_feats, base, mode="adaptive")
        expected = metrics.multilabel_scores(labels, gt, DOMAINS)
        assert result["pseudo_labels"][name]["adaptive"]["macro_f1"] == pytest.approx(expected["macro_f1"])
    # The learned context really differs from the stage-1 one (else the comparison is vacuous).
    with torch.no_grad():
        assert not torch.allclose(banks["stage1"]()[0], banks["learned"]()[0])


def test_translation_metrics_are_consistent(run_dir):
    tr = run_dir["result"]["translation"]
    assert set(tr["per_domain"]) == set(DOMAINS) and not tr["skipped"]
    for name, row in tr["per_domain"].items():
        assert row["num_real"] == PER_DOMAIN and row["num_translated"] == 6
        # Sources never already belong to the target domain.
        assert all(Path(p).parent.name != name for p in row["sources"])
        assert len(set(row["sources"])) == 6
        assert row["fd"] >= 0 and np.isfinite(row["kid"])
        assert 0 <= row["coverage"] <= 1 and row["density"] >= 0
        assert 0 <= row["domain_accuracy"] <= 1 and -1 <= row["content"] <= 1
    for key in ("fd", "kid", "density", "coverage", "domain_accuracy", "content"):
        values = [row[key] for row in tr["per_domain"].values()]
        assert tr["mean"][key] == pytest.approx(np.mean(values))
    summary = run_dir["result"]["summary"]
    assert summary["mFD"] == tr["mean"]["fd"] and summary["mKID"] == tr["mean"]["kid"]
    assert tr["identity_mean"]["content"] == 1.0
    # The real images of each target: the labeler's reading of genuine members, accuracies only.
    assert set(tr["real"]) == set(DOMAINS)
    for name, row in tr["real"].items():
        assert row["num_real"] == PER_DOMAIN
        assert 0 <= row["domain_accuracy"] <= 1 and 0 <= row["top1_accuracy"] <= 1
    for key in ("domain_accuracy", "top1_accuracy"):
        assert tr["real_mean"][key] == pytest.approx(np.mean([r[key] for r in tr["real"].values()]))
    assert tr["real_mean"]["fd"] is None and tr["real_mean"]["content"] is None


class _ColourReader(torch.nn.Module):
    """A labeler that reads an image's mean colour: features = the normalised mean RGB, domain
    texts = the red / green / blue axes, base prompt = grey. On the test's colour-coded images the
    adaptive rule turns exactly the image's own colour on."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)), dim=1)

    @staticmethod
    def bank():
        return torch.eye(3), torch.nn.functional.normalize(torch.ones(3), dim=0)


def _colour_read_quality(run_dir, painted: bool = False):
    """translation_quality of the run read by _ColourReader (optionally with _Painter as the
    generator): (result, run, images, features)."""
    from training.data import ImageSet

    run = eval_inputs.read_run(run_dir["run"], "cpu", progress=False)
    if painted:
        run.model.generator = _Painter()
        run.model.mapping = lambda z, weights: weights  # noqa: E731 (the style is the target row)
    images = ImageSet(run.paths, 32, progress=False)
    vl = _ColourReader()
    feats = lanit_eval.encode(vl, images, 16, "features", False)
    members = torch.tensor([[float(Path(p).parent.name == d) for d in DOMAINS] for p in run.paths])
    settings = lanit_eval.EvalSettings(n=6, kid_subsets=2, kid_subset_size=4, progress=False)
    tr = lanit_eval.translation_quality(vl, run, images, feats, members, _ColourReader.bank, settings)
    return tr, run, images, feats


def test_real_image_row_reads_the_targets_own_members(run_dir):
    """The "real images of the target" accuracies come from the target's members: a labeler that
    reads colours finds every red image red (1.0), where the sources (other colours) and an
    untrained generator's translations are not."""
    tr, *_ = _colour_read_quality(run_dir)
    for name in DOMAINS:
        assert tr["real"][name] == {"num_real": PER_DOMAIN, "domain_accuracy": 1.0, "top1_accuracy": 1.0}
        assert tr["identity"][name]["domain_accuracy"] == 0.0
    assert tr["real_mean"]["domain_accuracy"] == 1.0 and tr["real_mean"]["top1_accuracy"] == 1.0


class _Painter(torch.nn.Module):
    """A stand-in generator that paints each image its target's colour: the style it gets is the
    target's one-hot row (the stand-in mapping's), so a translation is its target's pure colour."""

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        colours = torch.tensor([COLOURS[d] for d in DOMAINS], dtype=torch.float32) / 127.5 - 1
        return (style[:, :3] @ colours)[:, :, None, None].expand(-1, -1, *x.shape[2:])


def test_translated_rows_measure_the_translations_into_each_target(run_dir):
    """With a generator that paints the target's colour and a labeler that reads colours, every
    translation lands in its target (domain accuracy 1), sits nearer the target's real images than
    its sources do, and keeps the content the colours share with the sources, computed here."""
    tr, run, images, feats = _colour_read_quality(run_dir, painted=True)
    for k, name in enumerate(DOMAINS):
        row = tr["per_domain"][name]
        assert row["domain_accuracy"] == 1.0 and row["top1_accuracy"] == 1.0
        assert row["fd"] < tr["identity"][name]["fd"]  # painted target colour vs untouched sources
        sources = [run.paths.index(Path(p)) for p in row["sources"]]
        painted = _ColourReader().encode_images(_Painter()(images.batch(torch.tensor(sources)),
                                              torch.eye(3)[[k] * len(sources)]))
        assert row["content"] == pytest.approx(metrics.content_preservation(feats[sources], painted))
        assert row["content"] < 0.99  # the sources are other colours


def test_identity_baseline_matches_direct_fd(run_dir):
    """Identity FD of a domain = FD between the features of its listed sources and its reals."""
    from training.data import ImageSet

    vl, tr = run_dir["vl"], run_dir["result"]["translation"]
    name = "green"
    sources = [Path(p) for p in tr["per_domain"][name]["sources"]]
    reals = sorted((run_dir["data"] / name).glob("*.png"))
    with torch.no_grad():
        src = vl.encode_images(ImageSet(sources, 32, progress=False).batch(torch.arange(len(sources))))
        real = vl.encode_images(ImageSet(reals, 32, progress=False).batch(torch.arange(len(reals))))
    assert tr["identity"][name]["fd"] == pytest.approx(metrics.frechet_distance(src, real), rel=1e-4)
    assert tr["identity"][name]["coverage"] == pytest.approx(metrics.density_coverage(real, src, k=5)[1])


def test_eval_is_deterministic_per_seed(run_dir, tmp_path):
    first = run_dir["result"]
    copy = tmp_path / "run"
    shutil.copytree(run_dir["run"], copy)
    argv = [str(copy)] + run_dir["argv"][1:]
    assert lanit_eval.main(argv) == 0
    again = json.loads((copy / "eval.json").read_text())
    assert again["translation"] == first["translation"]
    assert again["pseudo_labels"] == first["pseudo_labels"]
    # Another seed draws other sources (and here also a subsample of 6 of the 8 reals per domain).
    settings = lanit_eval.EvalSettings(n=6, seed=4, batch_size=16, max_real=6, progress=False)
    changed = lanit_eval.evaluate_run(copy, run_dir["vl"], gt=run_dir["gt"], settings=settings,
                                      cache_dir=run_dir["root"] / "cache")
    assert changed == json.loads((copy / "eval.json").read_text())
    red, first_red = changed["translation"]["per_domain"]["red"], first["translation"]["per_domain"]["red"]
    assert red["sources"] != first_red["sources"] and red["fd"] != first_red["fd"]
    assert red["num_real"] == 6 and first_red["num_real"] == PER_DOMAIN


def test_ground_truth_formats_agree(run_dir, tmp_path):
    paths = sorted(run_dir["data"].rglob("*.png"))
    from_csv = eval_inputs.read_ground_truth(run_dir["gt"], paths, DOMAINS)
    from_folders = eval_inputs.read_ground_truth(run_dir["data"], paths, DOMAINS)
    assert torch.equal(from_csv.labels, from_folders.labels)
    assert from_csv.labels.sum(dim=0).tolist() == [PER_DOMAIN] * 3
    # path,domains form with ';' lists, an unknown extra domain, and one domain missing.
    listed = tmp_path / "listed.csv"
    with open(listed, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "domains"])
        for p in paths:
            writer.writerow([str(p), "red;shiny" if p.parent.name == "red" else p.parent.name])
    only = eval_inputs.read_ground_truth(listed, paths, ("red", "green", "purple"))
    assert only.known == [True, True, False]
    assert only.known_domains == [0, 1]
    assert only.labels[:, 0].sum() == PER_DOMAIN and only.labels[:, 2].sum() == 0


def test_ground_truth_from_spreadsheets_and_multi_label_folders(run_dir, tmp_path):
    import shutil

    paths = sorted(run_dir["data"].rglob("*.png"))
    expected = eval_inputs.read_ground_truth(run_dir["gt"], paths, DOMAINS).labels
    # "CSV UTF-8" from a spreadsheet: a byte-order mark, and a space after each comma of the header.
    lines = run_dir["gt"].read_text().splitlines()
    excel = tmp_path / "excel.csv"
    excel.write_text("\ufeff" + ", ".join(lines[0].split(",")) + "\n" + "\n".join(lines[1:]) + "\n",
                     encoding="utf-8")
    assert torch.equal(eval_inputs.read_ground_truth(excel, paths, DOMAINS).labels, expected)
    with pytest.raises(eval_inputs.EvalError, match=r"names the domains \['blue', 'green', 'red'\], none "
                                                  r"of the run's \['teal', 'pink'\]"):
        eval_inputs.read_ground_truth(excel, paths, ("teal", "pink"))

    # A folder per domain where an image with two domains is copied into both folders; an empty
    # domain folder means no image has that domain.
    gt = tmp_path / "folders"
    for name in DOMAINS:
        shutil.copytree(run_dir["data"] / name, gt / name)
    shutil.copy(run_dir["data"] / "red" / "red_0.png", gt / "blue" / "red_0.png")
    (gt / "purple").mkdir()
    truth = eval_inputs.read_ground_truth(gt, paths, (*DOMAINS, "purple"))
    red_0 = paths.index(run_dir["data"] / "red" / "red_0.png")
    assert truth.labels[red_0].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert truth.labels.sum(dim=0).tolist() == [PER_DOMAIN, PER_DOMAIN, PER_DOMAIN + 1, 0]
    # Two different images of one name in two folders stay two images: matched by path only.
    Image.new("RGB", (8, 8), "white").save(gt / "green" / "red_1.png")
    with pytest.raises(eval_inputs.EvalError, match="misses 1 of the run's images"):
        eval_inputs.read_ground_truth(gt, paths, DOMAINS)


def test_emoji_ground_truth_from_names():
    from training.labeling.emoji import PERSON_DOMAINS, default_dataset, twemoji_entries

    paths, _ = default_dataset()
    truth = eval_inputs.emoji_ground_truth(paths, PERSON_DOMAINS + ("kitten",))
    assert truth.known == [True] * len(PERSON_DOMAINS) + [False]
    names = {str(e.path): e.name for e in twemoji_entries()}
    k = PERSON_DOMAINS.index("red hair")
    for path, row in zip(paths, truth.labels):
        assert bool(row[k]) == names[str(path)].endswith("red hair")


def test_cli_errors_are_one_line_messages(run_dir, tmp_path, capsys):
    assert lanit_eval.main([str(tmp_path / "missing"), "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial.csv"
    lines = run_dir["gt"].read_text().splitlines()
    partial.write_text("\n".join(lines[:5]) + "\n")
    argv = [str(run_dir["run"]), "--gt", str(partial), "--n", "4", "--no-progress",
            "--cache-dir", str(run_dir["root"] / "cache")]
    assert lanit_eval.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "misses" in err and len(err.strip().splitlines()) == 1


def test_helpers_on_hand_made_inputs(tmp_path):
    members = torch.tensor([[1.0, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])
    # Co-occurrence: (0,2) twice, then (0,1) and (1,3) once each -> lower indices first.
    assert lanit_eval.combination_targets(members, "abcd") == [(0, 2), (0, 1)]
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1, "time": 0.5, "loss": {"g": 2.0, "d": 1}, "note": "x"}\n\n'
                    '{"step": 2, "time": 1.0, "loss": {"g": 1.5, "d": 0.5}}\n')
    curves = eval_report.read_curves(file)
    assert curves == {"loss/g": [(1.0, 2.0), (2.0, 1.5)], "loss/d": [(1.0, 1.0), (2.0, 0.5)]}
    file.write_text('{"time": 1}\n')
    with pytest.raises(eval_inputs.EvalError, match="no 'step'"):
        eval_report.read_curves(file)
    file.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run killed while logging
    with pytest.warns(UserWarning, match="metrics.jsonl:2 is cut short"):
        assert eval_report.read_curves(file) == {"loss": [(1.0, 2.0)]}
    file.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(eval_inputs.EvalError, match="metrics.jsonl:1 is not JSON"):
        eval_report.read_curves(file)


# ----------------------------------------------------------------------------- where the data and outputs are

def _project(run_dir, tmp_path: Path) -> tuple[Path, Path]:
    """The run as `cd project && python -m training.run --data data --out runs/base` leaves it:
    train_config.json and pseudo_labels.csv hold the paths as given (relative to `project`). The
    images are renamed 0.png ... 7.png in each domain folder, so file names alone are ambiguous."""
    project = tmp_path / "project"
    rows = []
    for name in DOMAINS:
        (project / "data" / name).mkdir(parents=True)
        for i, src in enumerate(sorted((run_dir["data"] / name).glob("*.png"))):
            shutil.copy(src, project / "data" / name / f"{i}.png")
            rows.append((f"data/{name}/{i}.png", name))
    run = project / "runs" / "base"
    shutil.copytree(run_dir["run"], run)
    for name in eval_inputs.OUTPUT_FILES:
        (run / name).unlink(missing_ok=True)
    config = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**config, "data": "data", "out": "runs/base"}))
    with open(run / "pseudo_labels.csv", "w", newline="") as f:  # as the fixture's: blue never on
        csv.writer(f).writerows([["path", *DOMAINS]] + [[p, int(n == "red"), int(n == "green"), 0]
                                                         for p, n in rows])
    with open(project / "gt.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", *DOMAINS]] + [[p, *[int(d == n) for d in DOMAINS]] for p, n in rows])
    (tmp_path / "elsewhere").mkdir()
    return project, run


def test_a_relative_data_folder_is_found_from_another_folder(run_dir, tmp_path, monkeypatch, capsys):
    project, run = _project(run_dir, tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = [str(run), "--gt", str(project / "gt.csv"), "--n", "6", "--seed", "3", "--no-progress",
            "--cache-dir", str(run_dir["root"] / "cache"), "--batch-size", "16"]
    assert lanit_eval.main(argv) == 0, capsys.readouterr().err
    result = json.loads((run / "eval.json").read_text())
    assert result["data_dir"] == str(project / "data")
    # The same pixels as the fixture's run: the same numbers; the trainer's relative label rows
    # are read from the run's working folder (their names alone are ambiguous).
    labels, first = result["pseudo_labels"], run_dir["result"]["pseudo_labels"]
    assert labels["trainer"]["macro_f1"] == pytest.approx(2 / 3)
    assert labels["stage1"] == first["stage1"] and labels["learned"] == first["learned"]
    # With no usable --out, the folders above the run are searched.
    config = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**config, "out": str(tmp_path / "gone")}))
    assert eval_inputs.read_run(run, progress=False).data_dir == project / "data"


def test_the_runs_start_folder_comes_before_a_same_named_folder_here(run_dir, tmp_path, monkeypatch):
    """A `data` folder under the current folder is another folder: the run's own (from the folder it
    was started in) is found first, by training.eval as by --resume."""
    project, run = _project(run_dir, tmp_path)
    decoy = tmp_path / "elsewhere" / "data"
    shutil.copytree(project / "data", decoy)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert eval_inputs.read_run(run, progress=False).data_dir == project / "data"
    origin = run_folder.run_origin(run, "runs/base")
    assert origin == project
    assert run_folder.recorded_path_candidates("data", run, origin)[:2] == [project / "data", decoy]
    shutil.rmtree(project / "data")  # gone from the start folder: the one here is the next place tried
    assert eval_inputs.read_run(run, progress=False).data_dir == decoy


def test_a_missing_data_folder_names_the_places_tried_and_data_overrides_it(run_dir, tmp_path, monkeypatch,
                                                                             capsys):
    project, run = _project(run_dir, tmp_path)
    monkeypatch.chdir(tmp_path / "elsewhere")
    (project / "data").rename(project / "moved")
    argv = [str(run), "--gt", str(project / "gt.csv"), "--n", "6", "--no-progress",
            "--cache-dir", str(run_dir["root"] / "cache"), "--batch-size", "16"]
    assert lanit_eval.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--data" in err
    for tried in (tmp_path / "elsewhere" / "data", project / "data", project / "runs" / "data"):
        assert str(tried) in err
    (project / "gt.csv").write_text((project / "gt.csv").read_text().replace("data/", "moved/"))
    assert lanit_eval.main(argv + ["--data", str(project / "moved")]) == 0, capsys.readouterr().err
    result = json.loads((run / "eval.json").read_text())
    assert result["data_dir"] == str(project / "moved")
    assert result["pseudo_labels"]["trainer"]["macro_f1"] == pytest.approx(2 / 3)


def test_data_with_other_images_than_the_run_trained_on_is_flagged(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    config = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**config, "num_images": 3 * PER_DOMAIN}))
    other = tmp_path / "other"
    shutil.copytree(run_dir["data"] / "red", other)
    with pytest.warns(UserWarning, match=f"holds {PER_DOMAIN} readable images, the run trained on "
                                         f"{3 * PER_DOMAIN}"):
        eval_inputs.read_run(run, progress=False, data=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_inputs.read_run(run, progress=False, data=run_dir["data"])


def _no_image_features(monkeypatch) -> None:
    import training.labeling.pseudo_labels as pl

    def refuse(*args, **kwargs):
        raise AssertionError("image features computed before the settings were checked")

    monkeypatch.setattr(pl, "image_features", refuse)


def test_bad_settings_fail_before_any_feature_is_computed(run_dir, monkeypatch, capsys):
    _no_image_features(monkeypatch)
    argv = [str(run_dir["run"]), "--no-progress", "--cache-dir", str(run_dir["root"] / "cache")]
    assert lanit_eval.main(argv + ["--topk", "0"]) == 2
    assert "--topk" in capsys.readouterr().err
    assert lanit_eval.main(argv + ["--topk", "4"]) == 1  # the run has 3 domains
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "[1, 3]" in err and "--topk" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        assert lanit_eval.main(argv + ["--device", device]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--device {device}: no CUDA device" in err
    assert lanit_eval.main(argv + ["--device", "graphics-card"]) == 1
    assert capsys.readouterr().err.startswith("error: --device graphics-card")
    for bad, message in ((["--seed", "-1"], "--seed must be >= 0, got -1"),
                         (["--threshold", "nan"], "--threshold must be a finite number, got nan")):
        assert lanit_eval.main(argv + bad) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_damaged_run_files_and_foreign_text_are_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """A damaged prompts.safetensors, a train_config.json that is not UTF-8 or not an object, and a
    ground-truth CSV in a spreadsheet's code page: one line each (the last three before any
    feature is computed)."""
    import shutil

    cache = ["--no-progress", "--n", "2", "--cache-dir", str(run_dir["root"] / "cache")]
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run)
    (run / "prompts.safetensors").write_bytes(b"junk")
    assert lanit_eval.main([str(run), *cache]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prompts.safetensors is damaged or does not match" in err

    _no_image_features(monkeypatch)

    cp1252 = tmp_path / "gt.csv"
    cp1252.write_bytes("path,beard\nCaf\u00e9.png,1\n".encode("cp1252"))
    assert lanit_eval.main([str(run_dir["run"]), "--gt", str(cp1252), *cache]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gt.csv is not UTF-8 text" in err and "save it as CSV UTF-8" in err

    for text, message in ((b"\xff\xfe{}", "train_config.json is not valid JSON"),
                          (b"[1, 2]", "train_config.json holds a JSON list, not the run's settings")):
        (run / "train_config.json").write_bytes(text)
        assert lanit_eval.main([str(run), *cache]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("blocked", ["an output is a folder", "read-only run folder"])
def test_an_unwritable_run_folder_fails_before_any_feature_is_computed(run_dir, tmp_path, monkeypatch, capsys,
                                                                        refuse_new_files, blocked):
    copy = tmp_path / "run"
    shutil.copytree(run_dir["run"], copy)
    for name in eval_inputs.OUTPUT_FILES:
        (copy / name).unlink(missing_ok=True)
    if blocked == "an output is a folder":
        (copy / "eval.md").mkdir()
    else:
        refuse_new_files(copy)
    _no_image_features(monkeypatch)
    argv = [str(copy), "--no-progress", "--cache-dir", str(run_dir["root"] / "cache")]
    assert lanit_eval.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot write the evaluation" in err
    assert ("eval.md is an existing folder" if blocked == "an output is a folder" else "Permission denied") in err
    assert not (copy / "eval_samples.png").exists()


def test_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lanit_eval, "evaluate_run", interrupted)
    assert lanit_eval.main([str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: eval.json and eval.md were not written"
