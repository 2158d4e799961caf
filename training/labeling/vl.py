"""One vision-language interface over any open_clip model, for pseudo-labels and the DL loss.

`load_vision_language(name)` resolves a labeler name to a frozen `VisionLanguage`:

- ``"lanit-lite"``: the offline labeler packaged with this project
  (`training.labeling.lanit_lite.create_lanit_lite()`); ``"lanit-lite:none"`` gives it untrained heads
  (chance level, for comparisons) and ``"lanit-lite:/path/heads.safetensors"`` other heads.
- ``"ViT-B-32"`` (any open_clip model name): its default pretrained tag (``"openai"`` for
  ViT-B-32, else the first tag open_clip lists for the model).
- ``"MODEL:TAG"``: that open_clip pretrained tag. ``"MODEL:random"`` builds the architecture with
  random weights (tests and smoke runs only: its labels mean nothing).
- ``"MODEL@/path/to/weights"``: architecture MODEL with weights from a local file (open_clip's own
  checkpoint loader: safetensors, or a torch state dict read with ``weights_only=True``).
- ``"hf-hub:org/repo"``: open_clip's Hub loader.
- ``"/path/to/folder"`` or ``"local-dir:/path/to/folder"``: an open_clip folder,
  ``open_clip_config.json`` (with ``model_cfg`` and optional ``preprocess_cfg``, the Hugging Face
  Hub layout) beside one weights file.
- ``"/path/to/weights.safetensors"`` (any existing file): the architecture is read from a JSON
  sidecar, ``<file>.json`` or else ``open_clip_config.json`` in the same folder, holding either
  ``{"model_name": "ViT-B-32"}`` or a full ``{"model_cfg": ..., "preprocess_cfg": ...}``.

Named pretrained weights come from open_clip's cache (or its download, where a network exists).
When they cannot be had (offline), loading fails with a `VisionLanguageError` that suggests
``--labeler lanit-lite``, which needs no network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lanit_rt.errors import describe
from training.labeling.views import VisionLanguageError, check_views, image_view

LANIT_LITE = "lanit-lite"
DEFAULT_PRETRAINED = {"ViT-B-32": "openai"}
RANDOM_TAGS = ("random", "none")
OPEN_CLIP_CONFIG = "open_clip_config.json"


def import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"vision-language labelling needs open_clip: pip install 'lanit-rt[clip]' ({err})"
        ) from None
    return open_clip


class VisionLanguage(nn.Module):
    """A frozen open_clip model with the preprocessing that its image tower expects.

    `encode_images(x [N, 3, H, W] in [-1, 1]) -> [N, E]` and `encode_texts(list[str]) -> [T, E]`
    are L2-normalised fp32. Image encoding is differentiable w.r.t. the images; every parameter of
    the model is frozen and the model always stays in eval mode (dropout off, BatchNorm statistics
    fixed), whatever `.train()` is called on a parent module.

    `logit_scale` is the model's temperature as a plain multiplier (exp of the stored log scale,
    100 for OpenAI CLIP): `logits = logit_scale * cos`.

    `label_views` (names from `views.IMAGE_VIEWS`): labels are made from the mean of the model's
    embeddings of these views of each image (`training.labeling.pseudo_labels.image_features`); the DL loss
    and evaluation encode the plain view. CLIP models label the plain view; lanit-lite adds
    "thin-outlines" (see `training.labeling.lanit_lite.LanitLiteArch`).

    Text towers: the native CLIP text transformer (top-level attributes of `open_clip.CLIP`, or
    `open_clip.transformer.TextTransformer` as `model.text`) and `open_clip.hf_model.HFTextEncoder`.
    `embed_tokens` and `encode_token_embeddings` split text encoding at the token embeddings so that
    prompt learning (training/labeling/prompts.py) can substitute learnable context vectors.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_size: int | Sequence[int],
                 mean: Sequence[float], std: Sequence[float], name: str, centre_images: bool = False,
                 image_shift: torch.Tensor | None = None, set_centre_weight: float = 1.0,
                 label_views: Sequence[str] = ("plain",)) -> None:
        super().__init__()
        self.label_views = check_views(label_views, name)
        self.model = model
        self.tokenizer = tokenizer
        self.name = str(name)
        if isinstance(image_size, (tuple, list)):
            if len(set(int(s) for s in image_size)) != 1:
                raise VisionLanguageError(f"{name}: only square image inputs are supported, got {image_size}")
            image_size = image_size[0]
        self.image_size = int(image_size)
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], device=device).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std], device=device).view(1, 3, 1, 1),
                             persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._text_kind = _text_tower_kind(model)
        self._text_released = False
        self._fingerprint: str | None = None
        with torch.no_grad():
            probe = self.encode_texts(["a"])
        self.embed_dim = int(probe.shape[-1])
        # Set-relative image features (lanit-lite): encode_images subtracts `image_shift` before
        # normalising: the training centre until an image set is labelled, then a mix of that set's
        # mean raw embedding and the training centre (`set_image_centre`).
        self.centre_images = bool(centre_images)
        if not 0.0 <= float(set_centre_weight) <= 1.0:
            raise VisionLanguageError(f"set_centre_weight must be in [0, 1], got {set_centre_weight}")
        self.set_centre_weight = float(set_centre_weight)
        if self.centre_images and image_shift is None:
            image_shift = torch.zeros(self.embed_dim)
        if image_shift is not None:
            image_shift = image_shift.detach().float().to(device).reshape(self.embed_dim)
        self.register_buffer("trained_shift", image_shift, persistent=False)
        self.register_buffer("image_shift", None if image_shift is None else image_shift.clone(),
                             persistent=False)

    # -- housekeeping --------------------------------------------------------------------

    def train(self, mode: bool = True) -> "VisionLanguage":
        # The labeler is frozen: keep dropout off and BatchNorm statistics fixed.
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return 100.0
        return float(torch.as_tensor(scale).detach().float().exp().reshape(-1)[0])

    @property
    def identity(self) -> str:
        """A short hash of the name, the preprocessing and a fingerprint of every weight, so that
        feature caches never mix two models (random heads, retrained heads, other checkpoints)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            preprocessing = [self.name, self.image_size, self.mean.flatten().tolist(), self.std.flatten().tolist()]
            if self.label_views != ("plain",):  # plain-only identities stay as they were (caches)
                preprocessing.append(list(self.label_views))
            h.update(json.dumps(preprocessing).encode())
            with torch.no_grad():
                for key, tensor in sorted(self.model.state_dict().items()):
                    t = tensor.detach().reshape(-1)
                    # Strided sample + fp32 sum: cheap even for ViT-L; any retraining changes it.
                    step = max(1, t.numel() // 1024)
                    sample = t[::step].to("cpu", torch.float64)
                    h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
                    if t.is_floating_point():
                        h.update(t.cpu().float().sum().numpy().tobytes())  # on CPU: same bits on any device
                    h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint

    # -- images --------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """[-1, 1] images of any size -> the model's normalised input [N, 3, S, S]: (x + 1) / 2,
        short side resized to S (bicubic, antialiased) and centre-cropped, then (x - mean) / std.
        S is the model's `image_size` unless `size` is given (convolutional towers only)."""
        return (self._pixels(images, size) - self.mean) / self.std

    def _pixels(self, images: torch.Tensor, size: int | None) -> torch.Tensor:
        """`preprocess` before its normalisation: [0, 1] pixels [N, 3, S, S]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        x = (images.float() + 1.0) * 0.5
        size = size or self.image_size
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, :, top:top + size, left:left + size]
            # Bicubic overshoots; the model saw [0, 1] pixels in training.
            x = x.clamp(0.0, 1.0)
        return x

    def encode_images(self, images: torch.Tensor, raw: bool = False, size: int | None = None,
                      views: Sequence[str] = ("plain",)) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> L2-normalised features [N, E] fp32 (differentiable).

        raw=True returns the model's unnormalised, uncentred embeddings (what feature caches keep);
        `normalize_features` turns them into what raw=False returns. `size`: encode at this input
        size instead of `image_size` (see `preprocess`). `views`: the mean embedding of these views
        of each image (`views.IMAGE_VIEWS`; labelling passes `label_views`), encoded in one batch."""
        views = check_views(views, self.name)
        x = self._pixels(images.to(self.device), size)
        # One view (the DL loss, every step) goes straight through: no copy, no mean.
        batch = torch.cat([image_view(x, v) for v in views]) if len(views) > 1 else image_view(x, views[0])
        feats = self.model.encode_image((batch - self.mean) / self.std).float()
        if len(views) > 1:
            feats = feats.unflatten(0, (len(views), -1)).mean(0)
        return feats if raw else self.normalize_features(feats)

    def normalize_features(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw embeddings [N, E] -> the features labels are made from: centred when this labeler
        centres images, then L2-normalised."""
        if self.image_shift is not None:
            raw = raw - self.image_shift.to(raw.device)
        return F.normalize(raw, dim=-1)

    def set_image_centre(self, raw: torch.Tensor) -> None:
        """Centre later image features on `w * mean(raw) + (1 - w) * training centre`, w being
        `set_centre_weight`, for these raw embeddings [N, E] of the image set being labelled (NaN
        rows, from unreadable files, are ignored). A no-op for labelers that do not centre.

        lanit-lite's heads were trained on features with each emoji vendor's mean removed, so a
        vendor's drawing style, a constant offset in feature space, does not decide the labels; the
        same is done to the image set being labelled (and to images generated from it). The set's
        mean also holds what all its images show (a set of persons); removing it whole (w = 1)
        leaves every domain active on about half of the set, so lanit-lite keeps part of its
        training centre (w = 0.5, chosen on a training vendor held out from training)."""
        if not self.centre_images:
            return
        rows = raw[~torch.isnan(raw).any(dim=1)]
        if len(rows) == 0:
            raise ValueError("set_image_centre needs at least one finite feature row")
        w = self.set_centre_weight
        self.image_shift = w * rows.float().mean(0).to(self.device) + (1.0 - w) * self.trained_shift

    # -- texts ---------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """list of T strings -> token ids [T, L] on the model's device (L = context length)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def release_text_tower(self) -> None:
        """Free the text tower's weights (the bulk of them: the transformer and the token
        embeddings), for a caller that has encoded all the text it needs: a stage-1 run, whose DL
        loss runs the image tower only. Text encoding raises from then on. `identity` stays what it
        was (it is computed first)."""
        _ = self.identity
        if self._text_kind == "clip":
            self.model.transformer = None
            self.model.token_embedding = None
        else:
            self.model.text = None
        self._text_released = True

    def _check_text_tower(self) -> None:
        if self._text_released:
            raise VisionLanguageError(f"{self.name}: the text tower was released (release_text_tower)")

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """list of T strings -> L2-normalised features [T, E] fp32."""
        self._check_text_tower()
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        feats = self.model.encode_text(self.tokenize(texts))
        return F.normalize(feats.float(), dim=-1)

    def token_embedding_layer(self) -> nn.Embedding:
        self._check_text_tower()
        if self._text_kind == "clip":
            return self.model.token_embedding
        if self._text_kind == "text_transformer":
            return self.model.text.token_embedding
        return self.model.text.transformer.get_input_embeddings()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T, L] -> input token embeddings [T, L, W] (before positions)."""
        return self.token_embedding_layer()(ids)

    @property
    def padding_is_inert(self) -> bool:
        """True when trailing padding tokens cannot change the text features (causal attention, or
        padding masked out, and no appended CLS token): `encode_token_embeddings` may then be given
        ids and embeddings cut after the longest prompt's last real token, which saves compute."""
        self._check_text_tower()
        if self._text_kind == "clip":
            return self.model.attn_mask is not None
        if self._text_kind == "text_transformer":
            text = self.model.text
            return text.cls_emb is None and (text.attn_mask is not None or getattr(text, "use_pad_mask", False))
        return True  # HF encoders mask padding out of attention and pooling

    def encode_token_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Run the text tower on token embeddings [T, L, W] whose ids are `ids` [T, L] (the ids
        fix padding, attention masks and pooling positions). Returns unnormalised [T, E].
        With `embeds = embed_tokens(ids)` this equals `model.encode_text(ids)`; L may be shorter
        than the context length when `padding_is_inert`."""
        self._check_text_tower()
        if self._text_kind == "clip":
            return _clip_text_forward(self.model, embeds, ids)
        if self._text_kind == "text_transformer":
            return _text_transformer_forward(self.model.text, embeds, ids)
        return _hf_text_forward(self.model.text, embeds, ids)


def _text_tower_kind(model: nn.Module) -> str:
    text = getattr(model, "text", None)
    if text is None:
        if all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer",
                                            "ln_final")):
            return "clip"
    else:
        from open_clip.transformer import TextTransformer

        if isinstance(text, TextTransformer):
            return "text_transformer"
        if hasattr(text, "transformer") and hasattr(text, "pooler") and hasattr(text, "proj"):
            return "hf"
    raise VisionLanguageError(
        f"unsupported text tower {type(text if text is not None else model).__name__}: expected "
        "open_clip's CLIP text transformer or HFTextEncoder")


def _project(x: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Module):
        return projection(x)
    return x @ projection


def _clip_text_forward(model: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    seq_len = ids.shape[1]
    x = embeds.to(cast_dtype) + model.positional_embedding[:seq_len].to(cast_dtype)
    attn_mask = model.attn_mask[:seq_len, :seq_len] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=attn_mask)
    x = model.ln_final(x)  # [T, L, W]
    pool_type = getattr(model, "text_pool_type", "argmax")
    x = text_global_pool(x, ids, pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    return _project(x, model.text_projection)


def _text_transformer_forward(text: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from open_clip.transformer import text_global_pool

    cast_dtype = text.transformer.get_cast_dtype()
    x = embeds.to(cast_dtype)
    seq_len = ids.shape[1]
    if text.cls_emb is not None:
        cls = text.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([x, cls], dim=1)
        seq_len += 1
    attn_mask = text.attn_mask[:seq_len, :seq_len] if text.attn_mask is not None else None
    if getattr(text, "use_pad_mask", False) or text.cls_emb is not None:
        add_mask = text._build_additive_mask(ids, seq_len, x.dtype)
        attn_mask = add_mask if attn_mask is None else attn_mask.unsqueeze(0) + add_mask
    x = x + text.positional_embedding[:seq_len].to(cast_dtype)
    x = text.transformer(x, attn_mask=attn_mask)
    if text.cls_emb is not None:
        pooled = text.ln_final(x[:, -1])
    else:
        x = text.ln_final(x)
        pooled = text_global_pool(x, ids, pool_type=text.pool_type, eos_token_id=getattr(text, "eos_id", None))
    return _project(pooled, text.text_projection)


def _hf_text_forward(text: nn.Module, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    attn_mask = (ids != text.config.pad_token_id).long()
    out = text.transformer(inputs_embeds=embeds, attention_mask=attn_mask)
    pooled = text.pooler(out, attn_mask)
    return text.proj(pooled)


# ----------------------------------------------------------------------------- loading

def is_lanit_lite(name: str) -> bool:
    """Whether a labeler name selects the packaged lanit-lite model (any heads)."""
    name = str(name).strip()
    return name == LANIT_LITE or name.startswith(LANIT_LITE + ":")


def load_vision_language(name: str = LANIT_LITE, device: str | torch.device = "cpu") -> VisionLanguage:
    """Resolve a labeler name (see the module docstring) to a frozen `VisionLanguage` on `device`."""
    name = str(name).strip()
    if not name:
        raise VisionLanguageError("empty labeler name")
    if is_lanit_lite(name):
        vl = _load_lanit_lite(name, device)
    elif name.startswith("local-dir:"):
        vl = _load_open_clip_folder(name, Path(name.split(":", 1)[1]).expanduser(), device)
    elif name.startswith("hf-hub:"):
        vl = _load_hf_hub(name, device)
    elif "@" in name and not Path(name).exists():
        arch, weights = name.split("@", 1)
        vl = _load_arch_with_weights(name, arch, Path(weights).expanduser(), device)
    elif Path(name).expanduser().is_dir():
        vl = _load_open_clip_folder(name, Path(name).expanduser(), device)
    elif Path(name).expanduser().is_file():
        vl = _load_file_with_sidecar(name, Path(name).expanduser(), device)
    else:
        vl = _load_open_clip_name(name, device)
    return vl.to(device)


def _load_lanit_lite(name: str, device) -> VisionLanguage:
    try:
        from training.labeling.lanit_lite import create_lanit_lite
    except ImportError as err:
        raise VisionLanguageError(f"the {LANIT_LITE} labeler is not available ({err})") from None
    heads: Any = "default"
    if ":" in name:
        tag = name.split(":", 1)[1]
        heads = None if tag.lower() in RANDOM_TAGS else tag
    try:
        model, tokenizer, pre = create_lanit_lite(heads=heads, device=device)
    except (RuntimeError, ValueError, OSError) as err:
        raise VisionLanguageError(f"could not load {name}: {err}") from None
    return VisionLanguage(model, tokenizer, pre["image_size"], pre["mean"], pre["std"], name=name,
                          centre_images=pre["centre_images"], image_shift=pre["image_shift"],
                          set_centre_weight=pre["set_centre_weight"], label_views=pre["label_views"])


def _wrap(open_clip, model: nn.Module, tokenizer, name: str) -> VisionLanguage:
    pre = open_clip.get_model_preprocess_cfg(model)
    mean = pre.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = pre.get("std") or open_clip.OPENAI_DATASET_STD
    size = pre.get("size") or getattr(model.visual, "image_size", None)
    if size is None:
        raise VisionLanguageError(f"{name}: cannot tell the image tower's input size")
    return VisionLanguage(model, tokenizer, size, mean, std, name=name)


def _offline_hint(what: str, err: BaseException) -> VisionLanguageError:
    return VisionLanguageError(
        f"could not load {what}: {describe(err)} "
        f"(not in the local cache and no network? use --labeler {LANIT_LITE}, the packaged offline "
        "labeler, or a local checkpoint path)")


def _load_open_clip_name(name: str, device) -> VisionLanguage:
    open_clip = import_open_clip()
    arch, _, tag = name.partition(":")
    arch = arch.strip()
    tag = tag.strip()
    if arch not in open_clip.list_models():
        raise VisionLanguageError(
            f"unknown labeler {name!r}: not {LANIT_LITE!r}, an open_clip model name, MODEL:TAG, "
            "MODEL@/path/to/weights or an existing local path")
    if not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        tag = DEFAULT_PRETRAINED.get(arch) or (tags[0] if tags else "")
        if not tag:
            raise VisionLanguageError(f"open_clip lists no pretrained weights for {arch}; give MODEL@/path")
    if tag.lower() in RANDOM_TAGS:
        model = open_clip.create_model(arch, pretrained=None, device=device, pretrained_text=False)
    else:
        if tag not in open_clip.list_pretrained_tags_by_model(arch):
            raise VisionLanguageError(
                f"unknown pretrained tag {tag!r} for {arch}; "
                f"known: {open_clip.list_pretrained_tags_by_model(arch)}")
        try:
            model = open_clip.create_model(arch, pretrained=tag, device=device)
        except Exception as err:  # open_clip / huggingface_hub raise many types when offline
            raise _offline_hint(f"open_clip weights {arch}:{tag}", err) from None
    return _wrap(open_clip, model, open_clip.get_tokenizer(arch), name)


def _load_hf_hub(name: str, device) -> VisionLanguage:
    open_clip = import_open_clip()
    try:
        model = open_clip.create_model(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # offline: huggingface_hub raises its own error types
        raise _offline_hint(f"open_clip model {name}", err) from None
    return _wrap(open_clip, model, tokenizer, name)


def _load_arch_with_weights(name: str, arch: str, weights: Path, device) -> VisionLanguage:
    open_clip = import_open_clip()
    if arch not in open_clip.list_models():
        raise VisionLanguageError(f"{name!r}: unknown open_clip architecture {arch!r}")
    if not weights.is_file():
        raise VisionLanguageError(f"{name!r}: weights file {weights} does not exist")
    try:
        model = open_clip.create_model(arch, pretrained=str(weights), device=device)
    except Exception as err:
        raise VisionLanguageError(f"could not load {weights} into {arch}: {type(err).__name__}: {err}") from None
    return _wrap(open_clip, model, open_clip.get_tokenizer(arch), name)


def _load_open_clip_folder(name: str, folder: Path, device) -> VisionLanguage:
    open_clip = import_open_clip()
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise VisionLanguageError(f"{folder} is not an open_clip model folder (no {OPEN_CLIP_CONFIG})")
    ident = f"local-dir:{folder.resolve()}"
    try:
        model = open_clip.create_model(ident, device=device)
        tokenizer = open_clip.get_tokenizer(ident)
    except Exception as err:
        raise VisionLanguageError(
            f"could not load the open_clip folder {folder}: {type(err).__name__}: {err}") from None
    return _wrap(open_clip, model, tokenizer, name)


def _load_file_with_sidecar(name: str, weights: Path, device) -> VisionLanguage:
    sidecars = [weights.with_name(weights.name + ".json"), weights.with_name(OPEN_CLIP_CONFIG)]
    sidecar = next((p for p in sidecars if p.is_file()), None)
    if sidecar is None:
        raise VisionLanguageError(
            f"{weights}: cannot tell its architecture; write {sidecars[0].name} or {OPEN_CLIP_CONFIG} "
            "beside it, or name it as MODEL@/path/to/weights")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise VisionLanguageError(f"{sidecar}: unreadable JSON ({err})") from None
    arch = info.get("model_name") or info.get("arch") if isinstance(info, dict) else None
    if arch:
        return _load_arch_with_weights(name, str(arch), weights, device)
    if not isinstance(info, dict) or "model_cfg" not in info:
        raise VisionLanguageError(f"{sidecar}: needs 'model_name' or 'model_cfg'")
    # A full architecture: register it with open_clip under a name derived from its content.
    digest = hashlib.sha256(json.dumps(info["model_cfg"], sort_keys=True).encode()).hexdigest()
    arch = "lanit-local-" + digest[:12]
    register_model_config(arch, info["model_cfg"], str(sidecar))
    model = _load_arch_with_weights(name, arch, weights, device)
    pre = info.get("preprocess_cfg") or {}
    if pre.get("mean") and pre.get("std"):
        return VisionLanguage(model.model, model.tokenizer, pre.get("size", model.image_size),
                              pre["mean"], pre["std"], name=name)
    return model


def register_model_config(arch: str, model_cfg: Any, source: str) -> None:
    """Make `model_cfg` known to open_clip as `arch` in this process (a no-op when it is already).

    open_clip only takes configs from JSON files (`add_model_config`), and reads them at once: the
    file lives in a temporary folder for the call. The registry of this process is what is checked,
    never files left by another one. VisionLanguageError when open_clip does not take the config."""
    import tempfile

    open_clip = import_open_clip()
    if arch in open_clip.list_models():
        return
    if not isinstance(model_cfg, dict):
        raise VisionLanguageError(f"{source}: model_cfg must be a JSON object (an open_clip model config)")
    with tempfile.TemporaryDirectory(prefix="lanit-rt-open-clip-") as folder:
        cfg_file = Path(folder) / f"{arch}.json"
        cfg_file.write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(cfg_file)
    if arch not in open_clip.list_models():  # open_clip skips configs without these keys, silently
        raise VisionLanguageError(f"{source}: model_cfg must be an open_clip model config with "
                                  "'embed_dim', 'vision_cfg' and 'text_cfg'")


