"""Image conversion for the Translator: user images in, model batches, user images out.

Accepted inputs, single or batched:
- PIL images of any mode (a list is a batch), converted to RGB as the trainer converts its images
  (`to_rgb`: transparency composited onto white, 16-bit grey scaled to 8 bits);
- image files, as paths (str or os.PathLike; a list is a batch), read as the trainer reads its data
  (`open_rgb`: the EXIF orientation applied, then `to_rgb`) and returned as PIL images;
- uint8 numpy arrays [H, W, 3] (RGB), [H, W, 4] (RGBA, composited onto white) or [H, W] (grey);
  a list, or one [N, H, W, C] array, is a batch;
- float torch tensors in [-1, 1], [3, H, W] (a list is a batch) or [N, 3, H, W].

Every image is mapped to a float32 tensor in [-1, 1] (uint8 v -> v / 127.5 - 1) and resized to the
model size with antialiased bilinear interpolation. Outputs come back in the input's kind and
container (PIL in -> RGB PIL out, a [N, H, W, C] array in -> one [N, H, W, 3] array out), clamped
to [-1, 1] and, for uint8 kinds, rounded as round((y + 1) * 127.5). With `resize_back` every output
is resized to its input's size. uint8 data travels to the device as uint8 (4x fewer bytes than
float32) and is converted there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lanit_rt.errors import describe

KINDS = ("pil", "numpy", "tensor")
# Tensors are accepted slightly outside [-1, 1] so a generator output (clamped or not) can be fed back.
_RANGE_SLACK = 1e-3


@dataclass(frozen=True)
class ImageSpec:
    """How a user's images arrived, so results can be returned the same way.

    kind: "pil" | "numpy" | "tensor"; container: "single" (one image), "list", or "stacked" (one
    [N, H, W, 3] array or [N, 3, H, W] tensor); sizes: each image's (H, W); for tensors, their
    dtypes (one per image) and device.
    """

    kind: str
    container: str
    sizes: tuple[tuple[int, int], ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    device: torch.device | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The tensors' dtype when they share one (float32 for a list of mixed dtypes)."""
        if not self.dtypes:
            return None
        return self.dtypes[0] if len(set(self.dtypes)) == 1 else torch.float32

    @property
    def count(self) -> int:
        return len(self.sizes)


@dataclass
class RawImages:
    """Validated images before resizing: uint8 [N, H, W, 3] / float [N, 3, H, W] when every image has
    the same size, otherwise one tensor per image ([H, W, 3] uint8 or [3, H, W] float)."""

    spec: ImageSpec
    stacked: torch.Tensor | None
    items: list[torch.Tensor] | None


def _kind_of(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return "path"
    if isinstance(image, torch.Tensor):
        return "tensor"
    if isinstance(image, np.ndarray):
        return "numpy"
    try:
        from PIL import Image
    except ImportError:  # pillow is a core dependency; this only guards odd installs
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return "pil"
    raise TypeError(f"unsupported image type {type(image).__name__}; expected a PIL image, an image "
                    "file's path, a uint8 numpy array [H, W, 3] or a float tensor [3, H, W] / "
                    "[N, 3, H, W] in [-1, 1]")


# Integer grey modes whose samples are 16-bit. Pillow's own convert("RGB") clips them at 255, which
# turns a 16-bit image (mid grey = 32768) almost entirely white.
WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def wide_grey_to_l(image: Any) -> Any:
    """16-bit grey PIL image -> 8-bit "L": round(v * 255 / 65535), with v clipped to [0, 65535]; a
    transparent grey value (PNG tRNS) becomes white, as transparency does elsewhere."""
    from PIL import Image

    samples = np.asarray(image).astype(np.int64)  # [H, W]; I;16B arrives big-endian, astype fixes it
    grey = np.rint(np.clip(samples, 0, 65535) / 257.0).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        grey[samples == transparent] = 255
    return Image.fromarray(grey, "L")


def plain_rgb(image: Any) -> bool:
    """True for a PIL image that `to_rgb` returns as it is: mode RGB without a transparent colour."""
    return image.mode == "RGB" and "transparency" not in image.info


def to_rgb(image: Any) -> Any:
    """A PIL image of any mode as mode "RGB", the way training reads its images: transparent pixels
    become white (emoji and icons are drawn on a transparent canvas), whether an alpha channel, a
    palette entry or a colour key (PNG tRNS in grey, RGB and bilevel images) makes them so, and
    16-bit grey is scaled to 8 bits. Pillow's ValueError for a mode it cannot convert passes
    through."""
    from PIL import Image

    if plain_rgb(image):
        return image
    if image.mode in WIDE_GREY_MODES:
        return wide_grey_to_l(image).convert("RGB")
    if image.mode == "La":  # premultiplied grey + alpha: Pillow converts it to "LA" only
        image = image.convert("LA")
    # A palette index or a colour key; Pillow's RGBA conversion turns either into alpha.
    keyed = "transparency" in image.info
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or keyed:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Any:
    """The image file at `path` as an RGB PIL image, read as training reads its data: the EXIF
    orientation applied (phone photos come out as they are displayed), then `to_rgb`."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def _open_path(path: str | os.PathLike, index: int) -> Any:
    from PIL import Image

    name = os.fspath(path)
    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise ValueError(f"image {index}: no such file: {name}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, ...
        raise ValueError(f"image {index}: cannot read {name} ({describe(err)})") from None


def closed_unread(image: Any) -> bool:
    """True for a PIL image whose file was closed before its pixels were decoded (used after its
    `with Image.open(...)` block): Pillow then fails on an assert, without a message."""
    return bool(getattr(image, "tile", None)) and getattr(image, "fp", True) is None


def _pil_to_uint8(image: Any, index: int) -> torch.Tensor:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: empty PIL image of size {image.width}x{image.height} (W x H)")
    if closed_unread(image):
        raise ValueError(f"image {index}: this PIL image's file was closed before its pixels were "
                         "read; call .load() inside the `with Image.open(...)` block, or pass the path")
    try:  # Image.open decodes lazily: a truncated file fails here, on first access to its pixels
        rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    except (ValueError, OSError) as err:
        raise ValueError(f"image {index}: cannot read this PIL image ({image.mode}): {err}") from None
    return torch.from_numpy(rgb.copy())  # [H, W, 3]


def _numpy_to_uint8(array: np.ndarray, index: int) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise ValueError(f"image {index}: numpy images must be uint8 [H, W, 3], got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {index}: numpy images must be [H, W, 3] (RGB), [H, W, 4] (RGBA) or "
                         f"[H, W] (grey), got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image {index}: empty image of shape {tuple(array.shape)}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:  # alpha over white, rounded as Pillow's alpha_composite rounds
        alpha = array[:, :, 3:].astype(np.uint16)
        over = array[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha)
        array = ((over + 127) // 255).astype(np.uint8)
    if not array.flags.writeable:  # np.asarray(pil_image) is read-only; torch.from_numpy warns about it
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def _check_float_tensor(tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type == "meta":
        raise ValueError(f"{what}: a tensor on the meta device holds no data")
    if not tensor.is_floating_point():
        raise ValueError(f"{what}: tensors must be floating point in [-1, 1], got {tensor.dtype}")
    if tensor.shape[-3] != 3:
        raise ValueError(f"{what}: tensors must have 3 channels ([3, H, W] or [N, 3, H, W]), got "
                         f"shape {tuple(tensor.shape)}")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(f"{what}: empty image of shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        return
    # min and max propagate NaN and +-inf, so one reduction (one device sync) checks everything.
    low, high = torch.stack(torch.aminmax(tensor.detach())).float().cpu().tolist()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(f"{what}: tensor holds NaN or infinite values")
    if low < -1 - _RANGE_SLACK or high > 1 + _RANGE_SLACK:
        raise ValueError(f"{what}: tensor values must lie in [-1, 1], got [{low:.4g}, {high:.4g}]")


def load_images(images: Any) -> RawImages:
    """Validate user images and gather them as tensors (no resizing, no device transfer)."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("empty batch: pass at least one image")
        kinds = {_kind_of(image) for image in images}
        if len(kinds) > 1:
            raise TypeError(f"mixed image kinds in one batch: {sorted(kinds)}; use one kind per call")
        kind, container, items = kinds.pop(), "list", list(images)
        if kind == "path":
            kind, items = "pil", [_open_path(path, i) for i, path in enumerate(items)]
    else:
        kind = _kind_of(images)
        if kind == "numpy" and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("empty batch: the array holds 0 images")
            container, items = "stacked", list(images)
        elif kind == "tensor" and images.dim() == 4:
            _check_float_tensor(images, "images")
            if images.shape[0] == 0:
                raise ValueError("empty batch: the tensor holds 0 images")
            size = (int(images.shape[2]), int(images.shape[3]))
            count = images.shape[0]
            spec = ImageSpec("tensor", "stacked", (size,) * count, (images.dtype,) * count, images.device)
            return RawImages(spec, images, None)
        else:
            container, items = "single", [images]
        if kind == "path":
            kind, items = "pil", [_open_path(images, 0)]

    if kind == "tensor":
        for i, tensor in enumerate(items):
            if tensor.dim() != 3:
                raise ValueError(f"image {i}: image tensors must be [3, H, W] (or one [N, 3, H, W] "
                                 f"batch), got shape {tuple(tensor.shape)}")
            _check_float_tensor(tensor, f"image {i}")
        devices = {t.device for t in items}
        if len(devices) > 1:
            raise ValueError(f"images are on different devices: {sorted(map(str, devices))}")
        tensors = items
        sizes = tuple((int(t.shape[1]), int(t.shape[2])) for t in tensors)
        spec = ImageSpec(kind, container, sizes, tuple(t.dtype for t in items), items[0].device)
    else:
        convert = _pil_to_uint8 if kind == "pil" else _numpy_to_uint8
        tensors = [convert(image, i) for i, image in enumerate(items)]
        sizes = tuple((int(t.shape[0]), int(t.shape[1])) for t in tensors)
        spec = ImageSpec(kind, container, sizes)
    if len(set(sizes)) == 1:
        return RawImages(spec, torch.stack(tensors), None)
    return RawImages(spec, None, tensors)


def _uint8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float [N, 3, H, W] -> [N, 3, *size], antialiased bilinear (a no-op at the same size)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True)


def to_model_batch(raw: RawImages, size: int, device: torch.device | str,
                   staging: torch.Tensor | None = None) -> torch.Tensor:
    """Validated images -> float32 [N, 3, size, size] in [-1, 1] on `device`.

    `staging`, when given, is a (pinned) host uint8 buffer at least as large as the stacked uint8
    batch; copying through it lets the host-to-device transfer run asynchronously.
    """
    device = torch.device(device)
    target = (size, size)
    uint8 = raw.spec.kind != "tensor"

    def upload(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == device:
            return tensor
        if staging is not None and tensor.dtype == torch.uint8 and tensor.numel() <= staging.numel():
            host = staging[: tensor.numel()].view(tensor.shape)
            host.copy_(tensor)
            return host.to(device, non_blocking=True)
        return tensor.to(device)

    if raw.stacked is not None:
        batch = upload(raw.stacked)
        batch = _uint8_to_float(batch) if uint8 else batch.float()
        return _resize(batch, target).contiguous()
    resized = []
    for item in raw.items:
        item = upload(item)
        item = _uint8_to_float(item[None]) if uint8 else item[None].float()
        resized.append(_resize(item, target))
    return torch.cat(resized).contiguous()


def _float_to_uint8_hwc(images: torch.Tensor) -> torch.Tensor:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], round((y + 1) * 127.5)."""
    scaled = images.float().add(1.0).mul_(127.5).round_().clamp_(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _download(images: torch.Tensor, host_buffer: Callable[[int], torch.Tensor] | None) -> np.ndarray:
    """uint8 device tensor -> a numpy array the caller owns (via pinned memory for GPU tensors)."""
    if images.device.type == "cpu":
        return images.numpy()
    if host_buffer is None:
        return images.cpu().numpy()
    pinned = host_buffer(images.numel())[: images.numel()].view(images.shape)
    pinned.copy_(images)
    return pinned.numpy().copy()


def from_model_batch(output: torch.Tensor, spec: ImageSpec, resize_back: bool = False,
                     host_buffer: Callable[[int], torch.Tensor] | None = None) -> Any:
    """float [N, 3, S, S] model output -> the user's kind and container (see module docstring).

    Post-processing (clamp, resize, uint8 conversion) runs on the output's device; only the final
    uint8 images are copied to the host, through `host_buffer(numel)` (a pinned uint8 buffer of at
    least numel elements) when given and the output is on a GPU.
    """
    if output.shape[0] != spec.count:
        raise ValueError(f"expected {spec.count} outputs, got {output.shape[0]}")
    output = output.float().clamp(-1.0, 1.0)
    same_size = len(set(spec.sizes)) == 1
    if not resize_back:
        per_image = None
    elif same_size:
        output = _resize(output, spec.sizes[0]).clamp_(-1.0, 1.0)
        per_image = None
    else:
        per_image = [_resize(output[i: i + 1], hw).clamp_(-1.0, 1.0) for i, hw in enumerate(spec.sizes)]

    if spec.kind == "tensor":
        if per_image is None and spec.container == "stacked":
            return output.to(device=spec.device, dtype=spec.dtype)
        outputs = per_image if per_image is not None else list(output.split(1))
        items = [t[0].to(device=spec.device, dtype=dtype) for t, dtype in zip(outputs, spec.dtypes)]
        return items[0] if spec.container == "single" else items

    if per_image is not None:
        arrays = [_float_to_uint8_hwc(t).cpu().numpy()[0] for t in per_image]
    else:
        stacked = _download(_float_to_uint8_hwc(output), host_buffer)  # [N, H, W, 3]
        if spec.kind == "numpy" and spec.container == "stacked":
            return stacked
        arrays = list(stacked)
    if spec.kind == "pil":
        from PIL import Image
        arrays = [Image.fromarray(a, mode="RGB") for a in arrays]
    return arrays[0] if spec.container == "single" else arrays


def convert_images(images: Any, size: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, ImageSpec]:
    """Convenience: user images -> (float32 [N, 3, size, size] on `device`, their ImageSpec)."""
    raw = load_images(images)
    return to_model_batch(raw, size, device), raw.spec


__all__: Sequence[str] = ("ImageSpec", "RawImages", "convert_images", "from_model_batch",
                          "load_images", "open_rgb", "to_model_batch")
