"""Evaluation metrics as pure functions (numpy, float64).

Inputs may be numpy arrays or torch tensors; everything is converted to float64 numpy first, so the
results do not depend on the device or dtype the features were computed in.

- Multi-label classification: per-domain precision / recall / F1 and their macro average.
- Frechet distance between two feature sets (the FID formula on any feature extractor).
- KID: unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets.
- Density & Coverage (Naeem et al., ICML 2020) with k nearest neighbours among the real features.
- Domain accuracy of translations and content preservation (source/translation feature cosine).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _as_array(x: Any, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device and dtype
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _features(x: Any, name: str, min_rows: int = 1) -> np.ndarray:
    arr = _as_array(x, name, 2)
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {arr.shape[0]}")
    return arr


def _same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets have different widths: {a.shape[1]} vs {b.shape[1]}")


# --------------------------------------------------------------------------- classification

def multilabel_scores(predictions: Any, targets: Any,
                      names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-domain precision / recall / F1 of multi-hot predictions against multi-hot ground truth.

    predictions, targets: [N, D], any value > 0.5 counts as "on". For domain k, with TP/FP/FN
    counted over the N images: P = TP / (TP + FP), R = TP / (TP + FN), F1 = 2PR / (P + R). A ratio
    whose denominator is 0 is defined as 0 (a domain never predicted has precision 0), which is the
    usual convention and never inflates the score. Macro F1 = mean over domains of F1; micro F1 pools
    TP/FP/FN over all domains first.

    Returns {"per_domain": {name: {precision, recall, f1, support, predicted}}, "macro_precision",
    "macro_recall", "macro_f1", "micro_f1", "exact_match"} with plain Python floats/ints.
    """
    pred = _as_array(predictions, "predictions", 2) > 0.5
    true = _as_array(targets, "targets", 2) > 0.5
    if pred.shape != true.shape:
        raise ValueError(f"predictions {pred.shape} and targets {true.shape} differ in shape")
    n, d = true.shape
    if n == 0:
        raise ValueError("cannot score an empty set of images")
    names = list(names) if names is not None else [str(k) for k in range(d)]
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} domains")
    tp = (pred & true).sum(axis=0).astype(np.float64)
    fp = (pred & ~true).sum(axis=0).astype(np.float64)
    fn = (~pred & true).sum(axis=0).astype(np.float64)
    precision = _safe_ratio(tp, tp + fp)
    recall = _safe_ratio(tp, tp + fn)
    f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)  # = 2PR/(P+R), and 0 where TP = 0
    per_domain = {
        name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
               "support": int(true[:, k].sum()), "predicted": int(pred[:, k].sum())}
        for k, name in enumerate(names)
    }
    micro = _safe_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {
        "per_domain": per_domain,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "micro_f1": float(micro),
        "exact_match": float((pred == true).all(axis=1).mean()),
    }


def _safe_ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


# --------------------------------------------------------------------------- Frechet distance

def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """features [N, F] -> (mean [F], unbiased covariance [F, F]); N >= 2."""
    x = _features(features, "features", min_rows=2)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance_gaussians(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2):

    ||mu1 - mu2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1^1/2 C2 C1^1/2)^1/2).

    The cross term uses Tr((C1 C2)^1/2) = Tr((C1^1/2 C2 C1^1/2)^1/2), whose argument is symmetric
    PSD, so it is computed with two symmetric eigendecompositions and no complex sqrtm; eigenvalues
    that round below zero (rank-deficient covariances when N < F) are clipped to 0.
    """
    mu1, mu2 = _as_array(mu1, "mu1", 1), _as_array(mu2, "mu2", 1)
    cov1, cov2 = _as_array(cov1, "cov1", 2), _as_array(cov2, "cov2", 2)
    f = mu1.shape[0]
    if mu2.shape != (f,) or cov1.shape != (f, f) or cov2.shape != (f, f):
        raise ValueError(f"shapes do not match: mu {mu1.shape}/{mu2.shape}, cov {cov1.shape}/{cov2.shape}")
    sqrt1 = _psd_sqrt(cov1)
    middle = sqrt1 @ cov2 @ sqrt1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross
    # Rounding can leave a tiny negative value for identical statistics; the distance is >= 0.
    return float(max(value, 0.0))


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    sym = (cov + cov.T) / 2
    eig, vec = np.linalg.eigh(sym)
    return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [Na, F], [Nb, F] (FID's formula)."""
    a, b = _features(features_a, "features_a", 2), _features(features_b, "features_b", 2)
    _same_width(a, b)
    return frechet_distance_gaussians(*gaussian_stats(a), *gaussian_stats(b))


# --------------------------------------------------------------------------- KID

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (x.y / F + coef0)^degree, [Nx, Ny] (the kernel of Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 estimate between samples x [m, F] and y [n, F] (m, n >= 2):

    sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1)) - 2 mean_{i,j} k(x_i,y_j).
    It can be slightly negative when the distributions are equal.
    """
    m, n = x.shape[0], y.shape[0]
    kxx = polynomial_kernel(x, x, degree, coef0)
    kyy = polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    term_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def kernel_inception_distance(features_a: Any, features_b: Any, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0, degree: int = 3,
                              coef0: float = 1.0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over `num_subsets` random subsets.

    Each subset draws min(subset_size, Na, Nb) rows without replacement from each set (a seeded
    numpy Generator, so the result is deterministic). Returns (mean, std); at least 2 rows per set.
    """
    a, b = _features(features_a, "features_a", 2), _features(features_b, "features_b", 2)
    _same_width(a, b)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(int(subset_size), a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        xa = a[rng.choice(a.shape[0], size, replace=False)]
        xb = b[rng.choice(b.shape[0], size, replace=False)]
        values[i] = mmd2_unbiased(xa, xb, degree, coef0)
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------- Density & Coverage

def pairwise_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances [Nx, Ny], computed from the expansion and clipped at 0 before the sqrt."""
    sq = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(sq, 0.0, None))


def density_coverage(real_features: Any, fake_features: Any, k: int = 5) -> tuple[float, float]:
    """Density and Coverage of fake samples w.r.t. real ones (Naeem et al. 2020).

    r_i = distance from real X_i to its k-th nearest other real sample; B_i = open ball of radius
    r_i around X_i. With N reals and M fakes Y_j:
      density  = 1/(k M) sum_j sum_i 1[Y_j in B_i]   (1 on average when fakes match the reals; can exceed 1)
      coverage = 1/N     sum_i 1[some Y_j in B_i]    (in [0, 1])
    Needs N > k reals and at least one fake.
    """
    real = _features(real_features, "real_features", 1)
    fake = _features(fake_features, "fake_features", 1)
    _same_width(real, fake)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if real.shape[0] <= k:
        raise ValueError(f"density/coverage with k={k} needs more than {k} real samples, got {real.shape[0]}")
    real_real = pairwise_distances(real, real)
    np.fill_diagonal(real_real, np.inf)  # a sample is not its own neighbour
    radii = np.sort(real_real, axis=1)[:, k - 1]  # [N]
    inside = pairwise_distances(real, fake) < radii[:, None]  # [N, M]
    density = inside.sum() / (k * fake.shape[0])
    coverage = inside.any(axis=1).mean()
    return float(density), float(coverage)


# --------------------------------------------------------------------------- translation checks

def domain_accuracy(predicted_labels: Any, target_weights: Any) -> float:
    """Fraction of the requested (image, domain) pairs that the labeler finds in the translation.

    predicted_labels [N, D] multi-hot (labeler output on the translations), target_weights [N, D]
    (> 0 where a domain was requested). For one-hot targets this is the usual "the classifier
    assigns the target domain" accuracy; for multi-hot targets every requested domain counts once.
    """
    pred = _as_array(predicted_labels, "predicted_labels", 2) > 0.5
    target = _as_array(target_weights, "target_weights", 2) > 0
    if pred.shape != target.shape:
        raise ValueError(f"predicted labels {pred.shape} and targets {target.shape} differ in shape")
    total = target.sum()
    if total == 0:
        raise ValueError("no requested domain in target_weights")
    return float((pred & target).sum() / total)


def top1_accuracy(scores: Any, target_index: Any) -> float:
    """Fraction of rows of scores [N, D] whose arg-max is target_index [N] (ties go to the lower index)."""
    s = _as_array(scores, "scores", 2)
    t = np.asarray(target_index.detach().cpu() if hasattr(target_index, "detach") else target_index)
    if t.shape != (s.shape[0],):
        raise ValueError(f"target_index must be [{s.shape[0]}], got {t.shape}")
    return float((s.argmax(axis=1) == t).mean())


def content_preservation(source_features: Any, translated_features: Any) -> float:
    """Mean cosine similarity between each source feature and the feature of its translation ([N, F] each)."""
    src = _features(source_features, "source_features", 1)
    out = _features(translated_features, "translated_features", 1)
    if src.shape != out.shape:
        raise ValueError(f"source {src.shape} and translated {out.shape} features differ in shape")
    norms = np.linalg.norm(src, axis=1) * np.linalg.norm(out, axis=1)
    if np.any(norms == 0):
        raise ValueError("a zero feature vector has no direction")
    return float(((src * out).sum(axis=1) / norms).mean())
