"""Image folders for training: discovery, decoding, and StarGAN v2 augmentation.

Any folder (searched recursively) of JPEG / PNG / WebP files of any size or mode. Images are
converted to RGB (transparency composited onto white, since emoji and icons are drawn on a
transparent canvas), then resized and centre-cropped to the model size. Unreadable files are
skipped with a warning and counted; an empty result is an error raised before any work starts.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lanit_rt.images import open_rgb
from training.run_folder import TRAIN_CONFIG_FILE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
    """The training data cannot be used (missing folder, no readable image, ...)."""


def find_images(root: str | Path, leave_out: Sequence[str | Path] = ()) -> list[Path]:
    """All image files under `root`, sorted for reproducibility. Sub-folders are searched too,
    symlinked ones included (each real folder once, so link loops end); hidden files and folders
    (".DS_Store", macOS "._name.png" resource forks, ".git") are not images and are left out. So
    are training-run folders (holding train_config.json: sample sheets are not data, and a run kept
    inside its own data folder must find the same images when it resumes), and the folders in
    `leave_out`, each with everything under it."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    paths, seen = [], {os.path.realpath(folder) for folder in leave_out}
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        # Searched already (a link back), or left out: told to, or a run folder.
        if real in seen or TRAIN_CONFIG_FILE in files:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        paths += [Path(folder) / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
                  and (Path(folder) / name).is_file()]
    if not paths:
        raise DataError(f"no JPEG/PNG/WebP image found under {root}")
    return sorted(paths)


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image of any mode to RGB (`lanit_rt.images.open_rgb`, which the Translator shares
    for paths): an EXIF orientation is applied, transparent pixels become white, 16-bit grey is
    scaled to 8 bits, v / 257."""
    return open_rgb(path)


@dataclass(frozen=True)
class ScanResult:
    paths: list[Path]
    skipped: list[tuple[Path, str]]


def check_images(paths: Sequence[str | Path], progress: bool = True) -> ScanResult:
    """Decode every file once; keep the readable ones, warn about and count the others."""
    kept, skipped = [], []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not progress, leave=False):
        try:
            with Image.open(path) as img:
                img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, enough to catch corruption
                img.load()
                if img.width < 1 or img.height < 1:
                    raise ValueError("empty image")
            kept.append(Path(path))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            skipped.append((Path(path), f"{type(err).__name__}: {err}"))
    for path, why in skipped[:10]:
        warnings.warn(f"skipping unreadable image {path} ({why})", stacklevel=2)
    if len(skipped) > 10:
        warnings.warn(f"... and {len(skipped) - 10} more unreadable images", stacklevel=2)
    if not kept:
        raise DataError(f"none of the {len(paths)} image files could be read")
    return ScanResult(kept, skipped)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to `size` (bicubic) and crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# Augmentations by name (TrainConfig.augment). "resized-crop" is StarGAN v2's, the default. "shift"
# moves the image by whole pixels instead of resampling it: at 32 px the bilinear resize blurs half
# of the real images the discriminator sees. On the embedded default, shifts traded domain accuracy
# for content, within the seeds' spread (benchmarks/RESULTS.md). "flip" crops nothing.
AUGMENTATIONS = ("resized-crop", "shift", "flip")
# "shift" moves an image by -SHIFT_PIXELS..SHIFT_PIXELS pixels each way, about as far as the resized
# crop moves its centre (area 0.8-1) at 32 px.
SHIFT_PIXELS = 2


def augment_batch(images: torch.Tensor, gen: torch.Generator, mode: str = "resized-crop") -> torch.Tensor:
    """StarGAN v2's augmentation (or a variant, `mode`), vectorised over the batch.

    images [B, 3, S, S] float in [-1, 1]. With p=0.5 per image, a crop: "resized-crop" takes a
    random crop (area 0.8-1, aspect 0.9-1.1) and resamples it back to S x S (bilinear); "shift"
    moves the image by a whole number of pixels each way (edge pixels repeated); "flip" leaves it.
    Then a horizontal flip with p=0.5. All modes draw the same random numbers from `gen`, so a
    resumed run sees exactly the same batches.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; known: {', '.join(AUGMENTATIONS)}")
    b, size = images.shape[0], images.shape[-1]
    u = torch.rand(b, 6, generator=gen).to(images.device)
    crop = u[:, 0] < 0.5
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    ones, zeros = torch.ones_like(u[:, 0]), torch.zeros_like(u[:, 0])
    if mode == "resized-crop":
        area = torch.where(crop, 0.8 + 0.2 * u[:, 1], ones)
        log_ratio = math.log(0.9) + (math.log(1.1) - math.log(0.9)) * u[:, 2]
        ratio = torch.where(crop, log_ratio.exp(), ones)
        sx = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        sy = (area / ratio).sqrt().clamp(max=1.0)
        tx = (1 - sx) * (2 * u[:, 3] - 1)  # centre offset in normalised [-1, 1] coordinates
        ty = (1 - sy) * (2 * u[:, 4] - 1)
    else:
        # Whole pixels (a pixel is 2 / S in normalised coordinates): bilinear sampling at pixel
        # centres copies pixels, so nothing is blurred.
        span = 2 * SHIFT_PIXELS + 1
        shift = crop.float() if mode == "shift" else zeros
        sx = sy = ones
        tx = shift * (torch.floor(u[:, 3] * span) - SHIFT_PIXELS) * 2 / size
        ty = shift * (torch.floor(u[:, 4] * span) - SHIFT_PIXELS) * 2 / size
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class ImageSet:
    """The training images at the model size, as uint8 [3, S, S] tensors.

    Small sets (under `max_cache_bytes`) are decoded once, with a progress bar, and kept in memory;
    larger ones are decoded per batch. Batches are drawn by index; augmentation is vectorised.
    """

    def __init__(self, paths: Sequence[Path], img_size: int, progress: bool = True,
                 max_cache_bytes: int = 2 << 30):
        self.paths = list(paths)
        self.img_size = img_size
        self.cache: torch.Tensor | None = None
        if len(self.paths) * 3 * img_size * img_size <= max_cache_bytes:
            self.cache = torch.stack([self._decode(i) for i in tqdm(
                range(len(self.paths)), desc="loading images", unit="img", disable=not progress,
                leave=False)])  # [N, 3, S, S] uint8

    def _decode(self, index: int) -> torch.Tensor:
        return to_uint8(resize_center_crop(load_rgb(self.paths[index]), self.img_size))

    def __len__(self) -> int:
        return len(self.paths)

    def uint8(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B] -> uint8 images [B, 3, S, S]."""
        if self.cache is not None:
            return self.cache[indices]
        return torch.stack([self._decode(i) for i in indices.tolist()])

    def batch(self, indices: torch.Tensor, gen: torch.Generator | None = None,
              device: torch.device | str = "cpu", augment: str = "resized-crop") -> torch.Tensor:
        """indices [B] -> float images [B, 3, S, S] in [-1, 1], augmented (augment_batch's `mode`)
        when `gen` is given."""
        images = self.uint8(indices).to(device).float().div_(127.5).sub_(1.0)
        return images if gen is None else augment_batch(images, gen, augment)
