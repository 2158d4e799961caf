"""training.evaluation.metrics on constructed cases whose answers are worked out by hand or in closed form."""

import math

import numpy as np
import pytest
import torch

from training.evaluation import metrics


# --------------------------------------------------------------------------- F1

def test_multilabel_scores_hand_made_confusion():
    # Domain 0: TP=2 (rows 0,1), FP=1 (row 2), FN=1 (row 3) -> P=2/3, R=2/3, F1=2/3.
    # Domain 1: TP=1 (row 4), FP=0, FN=2 (rows 0, 5)        -> P=1,   R=1/3, F1=1/2.
    # Domain 2: never predicted, present once (row 1)       -> P=0,   R=0,   F1=0.
    targets = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])
    preds = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    out = metrics.multilabel_scores(preds, targets, names=["a", "b", "c"])
    a, b, c = (out["per_domain"][k] for k in "abc")
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert b["precision"] == pytest.approx(1.0) and b["recall"] == pytest.approx(1 / 3)
    assert b["f1"] == pytest.approx(0.5)
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert a["support"] == 3 and a["predicted"] == 3
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert out["macro_precision"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    # Micro: TP=3, FP=1, FN=4 -> 2*3 / (6 + 1 + 4).
    assert out["micro_f1"] == pytest.approx(6 / 11)
    # Rows that match exactly: row 2 (all off) only.
    assert out["exact_match"] == pytest.approx(1 / 6)


def test_multilabel_scores_perfect_and_thresholding():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    soft = targets * 0.9 + 0.05  # 0.95 / 0.05: still the same decisions at 0.5
    out = metrics.multilabel_scores(soft, targets)
    assert out["macro_f1"] == 1.0 and out["exact_match"] == 1.0
    assert set(out["per_domain"]) == {"0", "1"}
    with pytest.raises(ValueError, match="shape"):
        metrics.multilabel_scores(targets[:, :1], targets)


# --------------------------------------------------------------------------- Frechet distance

def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than dimensions: rank-deficient covariance must still give 0, not NaN.
    few = feats[:8]
    assert metrics.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)


def test_frechet_shift_is_squared_norm_of_shift():
    feats = np.random.default_rng(1).normal(size=(100, 5))
    shift = np.array([3.0, 0.0, -4.0, 0.0, 0.0])  # |shift|^2 = 25, covariance unchanged
    assert metrics.frechet_distance(feats, feats + shift) == pytest.approx(25.0, rel=1e-9)
    assert metrics.frechet_distance(torch.tensor(feats), torch.tensor(feats + 10 * shift)) == \
        pytest.approx(2500.0, rel=1e-9)


def test_frechet_gaussians_closed_forms():
    # Commuting covariances: diag(1,4) vs diag(4,1): Tr sqrt(C1 C2) = Tr diag(2,2) = 4.
    fd = metrics.frechet_distance_gaussians([0, 0], np.diag([1.0, 4.0]), [3, 0], np.diag([4.0, 1.0]))
    assert fd == pytest.approx(9 + 5 + 5 - 2 * 4)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
    fd1 = metrics.frechet_distance_gaussians([1.0], [[4.0]], [-1.0], [[9.0]])
    assert fd1 == pytest.approx(4 + 1)
    # Non-commuting 2x2 covariances: for a 2x2 matrix M with real non-negative eigenvalues,
    # Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    c1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    c2 = np.array([[3.0, 0.0], [0.0, 1.0]])
    prod = c1 @ c2
    cross = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    mu1, mu2 = np.array([1.0, 2.0]), np.array([0.0, -1.0])
    expected = 1 + 9 + np.trace(c1) + np.trace(c2) - 2 * cross
    assert metrics.frechet_distance_gaussians(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance_gaussians(mu2, c2, mu1, c1) == pytest.approx(expected, rel=1e-10)


def test_frechet_samples_match_population_formula():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 2)) * np.array([1.0, 2.0])           # N(0, diag(1, 4))
    b = rng.normal(size=(20000, 2)) * np.array([2.0, 1.0]) + [3, 0]  # N((3,0), diag(4, 1))
    assert metrics.frechet_distance(a, b) == pytest.approx(11.0, rel=0.03)
    with pytest.raises(ValueError, match="widths"):
        metrics.frechet_distance(a, b[:, :1])


# --------------------------------------------------------------------------- KID

def test_frechet_small_sets_use_the_unbiased_covariance_by_hand():
    """1-D, 3 and 4 samples: means 1 and 3, variances (ddof 1) 1 and 20/3, so
    FD = (1 - 3)^2 + 1 + 20/3 - 2 sqrt(20/3); the biased variances would give 6.015, not 6.503."""
    a = np.array([[0.0], [1.0], [2.0]])
    b = np.array([[0.0], [2.0], [4.0], [6.0]])
    expected = 4.0 + 1.0 + 20.0 / 3.0 - 2.0 * np.sqrt(20.0 / 3.0)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_mmd2_constant_sets_by_hand():
    # x_i = (1, 1), y_j = (1, -1), F = 2: k(x,x) = (2/2+1)^3 = 8, k(y,y) = 8, k(x,y) = (0+1)^3 = 1.
    x = np.tile([1.0, 1.0], (4, 1))
    y = np.tile([1.0, -1.0], (3, 1))
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(8 + 8 - 2 * 1)
    # Linear kernel (degree 1, coef0 0) on constant sets: |a - b|^2 / F.
    assert metrics.mmd2_unbiased(x, y, degree=1, coef0=0.0) == pytest.approx(4 / 2)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_std = metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = metrics.kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02
    assert same_std > 0
    assert shifted > 0.5 and shifted > 20 * abs(same)
    # Seeded: the same call gives the same numbers; a different seed changes the subsets.
    again = metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    assert again == (same, same_std)
    assert metrics.kernel_inception_distance(a, b, num_subsets=20, subset_size=200, seed=1) != again
    with pytest.raises(ValueError):
        metrics.kernel_inception_distance(a[:1], b)


# --------------------------------------------------------------------------- Density & Coverage

def test_density_coverage_identical_sets():
    feats = np.random.default_rng(4).normal(size=(60, 6))
    density, coverage = metrics.density_coverage(feats, feats, k=5)
    # Each real's ball (open, radius = its 5th-neighbour distance) holds itself and 4 others.
    assert coverage == 1.0
    assert density == pytest.approx(1.0)


def test_density_coverage_hand_built_1d():
    reals = np.array([[0.0], [1.0], [3.0], [7.0]])
    fakes = np.array([[0.5], [5.5], [100.0]])
    # k=1 radii: 1, 1, 2, 4. 0.5 lies in the balls of 0 and 1; 5.5 in the ball of 7; 100 in none.
    density, coverage = metrics.density_coverage(reals, fakes, k=1)
    assert density == pytest.approx((2 + 1 + 0) / (1 * 3))
    assert coverage == pytest.approx(3 / 4)
    # k=2 radii: 3, 2, 3, 6. 0.5 in balls of 0, 1, 3; 5.5 in balls of 3, 7.
    density, coverage = metrics.density_coverage(reals, fakes, k=2)
    assert density == pytest.approx((3 + 2 + 0) / (2 * 3))
    assert coverage == 1.0


def test_density_coverage_disjoint_sets_are_zero_and_k_is_checked():
    rng = np.random.default_rng(5)
    reals = rng.normal(size=(30, 4))
    assert metrics.density_coverage(reals, reals + 100.0, k=5) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 5"):
        metrics.density_coverage(reals[:5], reals, k=5)


# --------------------------------------------------------------------------- translation checks

def test_domain_accuracy_and_top1():
    requested = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])
    found = np.array([[1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    # Requested pairs: 5; found among them: (0,0), (2,0), (3,2) -> 3/5.
    assert metrics.domain_accuracy(found, requested) == pytest.approx(3 / 5)
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.3], [0.0, 0.5, 0.5]])
    assert metrics.top1_accuracy(scores, [0, 1, 1]) == pytest.approx(2 / 3)  # tie -> lower index
    with pytest.raises(ValueError, match="no requested"):
        metrics.domain_accuracy(found, np.zeros_like(requested))


def test_content_preservation_cosines():
    src = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert metrics.content_preservation(src, 5 * src) == pytest.approx(1.0)
    assert metrics.content_preservation(src, -src) == pytest.approx(-1.0)
    out = np.array([[0.0, 1.0], [0.0, 1.0], [4.0, 3.0]])  # cosines 0, 1, 24/25
    assert metrics.content_preservation(src, out) == pytest.approx((0 + 1 + 24 / 25) / 3)
