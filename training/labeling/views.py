"""The input views a labeler may average when it labels, and the labeler's error.

Below both training.labeling.vl (which encodes the views of any open_clip model) and
training.labeling.lanit_lite (whose architecture names its label views), so neither imports the other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class VisionLanguageError(RuntimeError):
    """A labeler name cannot be resolved or its weights cannot be loaded."""


# Input views whose embeddings a labeler may average when it labels (`VisionLanguage.label_views`).
# "thin-outlines": a grey-scale dilation (max filter) that thins dark outlines and strokes, the
# 3x3 max filter of align's training restyle (`training.labeling.align_data._restyle`) on 72-pixel emoji,
# scaled to the input size.
IMAGE_VIEWS = ("plain", "thin-outlines")


def outline_kernel(size: int) -> int:
    """Odd max-filter width at input side `size` that matches a 3-pixel filter at 72 pixels
    (3 at 72, 5 at 128, 9 at 224)."""
    return 2 * max(0, round((3 * size / 72 - 1) / 2)) + 1


def image_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One input view of square images x [N, 3, S, S] (any monotone pixel scale)."""
    if view == "plain":
        return x
    if view == "thin-outlines":
        k = outline_kernel(x.shape[-1])
        # Separable: the same maximum as one k x k window, ~1.5x faster on CPU.
        return F.max_pool2d(F.max_pool2d(x, (k, 1), 1, (k // 2, 0)), (1, k), 1, (0, k // 2))
    raise VisionLanguageError(f"unknown image view {view!r}; known: {IMAGE_VIEWS}")


def check_views(views: Sequence[str], name: str,
                error: type[Exception] = VisionLanguageError) -> tuple[str, ...]:
    """`views` as a tuple of distinct `IMAGE_VIEWS` names; raises `error` otherwise."""
    views = tuple(str(v) for v in views)
    if not views or len(set(views)) != len(views) or not set(views) <= set(IMAGE_VIEWS):
        raise error(f"{name}: views must be distinct names from {IMAGE_VIEWS}, got {views}")
    return views
