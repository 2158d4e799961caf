"""Import released StarGAN v2 / LANIT checkpoints (`*_nets_ema.ckpt`) as lanit-rt checkpoints.

The official checkpoints are `torch.save` dicts `{"generator": state, "mapping_network": state,
"style_encoder": state, ...}` (LANIT adds `promptLearner`; the `*_nets.ckpt` files add
`discriminator`; DataParallel may prefix keys with `module.`). They are read with
`torch.load(weights_only=True)`: no pickled code runs.

Every architectural number is inferred from tensor shapes and cross-checked between the three
networks (image size from the generator's block count, widths from its convolutions, domains and
style / latent sizes from the mapping network's heads), then the weights are renamed into
lanit-rt's layout, where the per-domain heads are stacked (one grouped matmul instead of a Python
loop) and the decoder's AdaIN Linears are concatenated into one:

    official                                  lanit-rt
    generator.decode.i.norm{1,2}.fc           generator.style_to_adain (rows in decoder order)
    mapping_network.unshared.k.{0,2,4,6}      mapping.head_weights.j[k] (transposed), head_biases.j[k]
    style_encoder.shared / unshared.k         style_encoder.trunk / heads (rows k*S..(k+1)*S)

The result loads with `lanit_rt.load_checkpoint` and translates exactly as the official networks
do (tests/test_import.py). LANIT's prompt learner only shapes the pseudo-labels during training:
inference needs none of it, so it is not imported. Models trained with `w_hpf > 0` (StarGAN v2's
CelebA-HQ model: one more down/up block, no decoder skip, and a FAN landmark network masking a
high-pass path) are refused: that path is not implemented here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lanit_export.errors import ExportError
from lanit_rt.checkpoint import not_a_torch_file, torch_load_failure
from lanit_rt.config import ConfigError, LanitConfig
from lanit_rt.errors import first_line
from lanit_rt.networks import Generator, MappingNetwork, StyleEncoder

NETS = ("generator", "mapping_network", "style_encoder")

# Domain texts of the LANIT data sets as the official repository lists them
# (core/utils.py get_prompt_and_att, by data set and --num_domains), in that order: a checkpoint's
# head k belongs to text k. Lists the repository gives for another data set (metfaces and lsun-car
# at some counts repeat other sets' texts) are left out.
_CELEBA_ALL = (
    "5 o clock shadow", "arched eyebrows", "attractive face", "bags under eyes", "bald", "bangs",
    "big lips", "big Nose", "black hair", "blond hair", "blurry", "brown hair", "bushy eyebrows",
    "cubby", "double chin", "eyeglasses", "goatee", "gray hair", "heavy makeup", "high cheekbones",
    "male", "mouth slightly open", "mustache", "narrow eyes", "no beard", "oval face", "pale skin",
    "pointy nose", "receding hairline", "rosy cheeks", "sideburns", "smiling", "straight hair",
    "wavy hair", "wearing earrings", "wearing hat", "wearing lipstick", "wearing necklace",
    "wearing necktie", "young",
)
_CELEBA_16 = ("bangs", "blond hair", "black hair", "smiling", "arched eyebrows", "heavy makeup",
              "mustache", "straight hair", "wearing lipstick", "male", "eyeglass", "pale skin",
              "young", "wavy hair", "bald", "goatee")
_ANIMALS_16 = ("beagle", "dandie dinmont terrier", "golden retriever", "malinois",
               "appenzeller sennenhund", "white fox", "tabby cat", "snow leopard", "lion",
               "bengal tiger", "french bulldog", "mink", "maned wolf", "monkey", "toy poodle",
               "angora rabbit")
_FOOD_16 = ("baby back ribs", "beef carpaccio", "beignets", "bibimbap", "caesar salad",
            "clam chowder", "dumplings", "edamame", "spaghetti bolognese", "strawberry shortcake",
            "apple pie", "chicken wings", "ice cream", "oyster", "pizza", "tacos")
_ANIME_10 = ("brown hair", "red hair", "black hair", "purple hair", "blond hair", "blue hair",
             "pink hair", "silver hair", "green hair", "white hair")

LANIT_DOMAIN_SETS: dict[str, tuple[str, ...]] = {
    "celeba-hq-2": ("male", "female"),
    "celeba-hq-4": ("blond hair", "bangs", "smiling", "wearing lipstick"),
    "celeba-hq-7": ("blond hair", "black hair", "smiling", "wearing lipstick", "arched eyebrows",
                    "bangs", "mustache"),
    "celeba-hq-10": _CELEBA_16[:10],
    "celeba-hq-13": _CELEBA_16[:13],
    "celeba-hq-16": _CELEBA_16,
    "celeba-hq-40": _CELEBA_ALL,
    "animal-faces-4": ("beagle", "golden retriever", "tabby cat", "bengal tiger"),
    "animal-faces-7": ("beagle", "dandie dinmont terrier", "golden retriever", "white fox",
                       "tabby cat", "snow leopard", "bengal tiger"),
    "animal-faces-10": _ANIMALS_16[:10],
    "animal-faces-13": _ANIMALS_16[:13],
    "animal-faces-16": _ANIMALS_16,
    "food-4": ("baby back ribs", "beignets", "dumplings", "edamame"),
    "food-7": ("baby back ribs", "beef carpaccio", "beignets", "clam chowder", "dumplings",
               "edamame", "strawberry shortcake"),
    "food-10": _FOOD_16[:10],
    "food-13": _FOOD_16[:13],
    "food-16": _FOOD_16,
    "anime-4": _ANIME_10[:4],
    "anime-7": _ANIME_10[:7],
    "anime-10": _ANIME_10,
    "metfaces-10": ("oil painting", "grayscale", "black hair", "wavy hair", "male", "mustache",
                    "smiling", "gray hair", "blonde hair", "sculpture"),
    "lhq-10": ("mountain", "field", "lake", "ocean", "waterfall", "summer", "winter", "a sunny day",
               "a cloudy day", "sunset"),
    "lsun-car-4": ("red car", "truck", "van", "white car"),
    "lsun-car-10": ("red car", "orange car", "gray car", "blue car", "truck", "white car",
                    "sports car", "van", "sedan", "compact car"),
}
DOMAIN_SET_PREFIX = "lanit:"


class ImportCheckpointError(ExportError):
    """The file is not an importable StarGAN v2 / LANIT checkpoint, or does not match --domains."""


@dataclass
class OfficialModel:
    """An official checkpoint converted: config, lanit-rt networks (eval mode) and what was found."""

    config: LanitConfig
    generator: Generator
    mapping: MappingNetwork
    style_encoder: StyleEncoder
    source_keys: tuple[str, ...]  # the top-level keys of the file (e.g. promptLearner, discriminator)


def resolve_domains(text: str) -> tuple[str, ...]:
    """`"lanit:NAME"` (LANIT_DOMAIN_SETS) or comma-separated domain texts -> the texts, in order."""
    text = text.strip()
    if text.startswith(DOMAIN_SET_PREFIX):
        name = text[len(DOMAIN_SET_PREFIX):]
        if name not in LANIT_DOMAIN_SETS:
            raise ImportCheckpointError(f"unknown LANIT domain set {name!r}; known: "
                                        f"{', '.join(sorted(LANIT_DOMAIN_SETS))}")
        return LANIT_DOMAIN_SETS[name]
    domains = tuple(d.strip() for d in text.split(",") if d.strip())
    if not domains:
        raise ImportCheckpointError("--domains is empty: give comma-separated texts or lanit:NAME")
    return domains


def _what_it_holds(data: object) -> str:
    """A short account of a foreign checkpoint's top level, naming a lanit-rt file as such."""
    if not isinstance(data, dict):
        return type(data).__name__
    keys = sorted(map(str, data))
    shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
    ours = {"nets", "ema"} <= set(keys) or any(k.startswith(("generator.", "mapping.", "style_encoder."))
                                               for k in keys)
    hint = ("; it is lanit-rt's own (a run folder's checkpoint or resume state), which needs no "
            "import: pass its run folder to lanit-export or Translator.from_checkpoint") if ours else ""
    return f"[{shown}]{hint}"


def load_official_state(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read `path` with torch.load(weights_only=True) -> {net name: state dict without `module.`}."""
    path = Path(path)
    if not path.is_file():
        raise ImportCheckpointError(f"no checkpoint file at {path}")
    reason = not_a_torch_file(path)
    if reason is not None:
        raise ImportCheckpointError(f"{path} is not a PyTorch checkpoint ({reason})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for non-checkpoint files
        raise ImportCheckpointError(f"{path} is not a PyTorch checkpoint that loads with "
                                    f"weights_only=True ({torch_load_failure(err)})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(n), dict) for n in NETS):
        raise ImportCheckpointError(
            f"{path} is not a StarGAN v2 / LANIT network checkpoint (*_nets_ema.ckpt): it needs "
            f"{', '.join(NETS)} state dicts, found {_what_it_holds(data)}")
    states = {}
    for name in NETS:
        state = {}
        for key, value in data[name].items():
            if not isinstance(value, torch.Tensor):
                raise ImportCheckpointError(f"{path}: {name}.{key} is not a tensor")
            state[re.sub(r"^(module\.)+", "", str(key))] = value.float()
        states[name] = state
    states["_keys"] = {str(k): torch.empty(0) for k in data}
    return states


def _need(state: dict[str, torch.Tensor], key: str, net: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise ImportCheckpointError(f"{path}: {net} has no '{key}': not a StarGAN v2 / LANIT "
                                    f"{net} (its keys start {sorted(state)[:4]})")
    return state[key]


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices i appear in keys matching `pattern` (a regex with one group)."""
    return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def infer_config(states: dict[str, dict[str, torch.Tensor]], domains: tuple[str, ...],
                 path: Path) -> LanitConfig:
    """The LanitConfig of an official checkpoint, from its tensor shapes; raises on inconsistency."""
    gen, mapping, encoder = (states[n] for n in NETS)
    if "hpf.filter" in gen or any(k.startswith("fan.") for k in states["_keys"]):
        raise ImportCheckpointError(
            f"{path} is a w_hpf > 0 model (StarGAN v2 CelebA-HQ style: a FAN-masked high-pass "
            "skip and one more down/up block), which lanit-rt does not implement; only w_hpf = 0 "
            "checkpoints (AFHQ, LANIT's released models) can be imported")
    stem = _need(gen, "from_rgb.weight", "generator", path)
    if stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 3, 3):
        raise ImportCheckpointError(f"{path}: generator.from_rgb.weight is {list(stem.shape)}, "
                                    "not the official 3x3 RGB stem [C, 3, 3, 3]")
    base_dim = int(stem.shape[0])
    num_encode = _count(gen, r"encode\.(\d+)\.conv1\.weight")
    num_down = num_encode - 2
    if num_down < 1:
        raise ImportCheckpointError(f"{path}: the generator has {num_encode} encoder blocks; "
                                    "StarGAN v2 has at least 3")
    # StarGAN v2 with w_hpf > 0 has log2(size) - 3 down blocks and no decoder skips: its shape
    # alone reads like a model twice the size, so the encoder's and style encoder's depths are
    # compared before trusting either.
    num_trunk = _count(encoder, r"shared\.(\d+)\.conv1\.weight")
    img_size = 2 ** (num_down + 4)
    if num_trunk != num_down + 2:
        if num_trunk == num_down + 1:
            raise ImportCheckpointError(
                f"{path}: the generator has one down-sampling block more than a w_hpf = 0 model "
                f"of its style encoder's size ({2 ** (num_trunk + 2)} px): a w_hpf > 0 model, "
                "whose FAN-masked high-pass path lanit-rt does not implement")
        raise ImportCheckpointError(
            f"{path}: the generator ({num_down} down blocks, {img_size} px) and the style encoder "
            f"({num_trunk} down blocks, {2 ** (num_trunk + 2)} px) disagree on the image size")
    widths = [int(_need(gen, f"encode.{i}.conv2.weight", "generator", path).shape[0])
              for i in range(num_encode)]
    max_dim = max(widths)
    num_heads = _count(mapping, r"unshared\.(\d+)\.0\.weight")
    first = _need(mapping, "shared.0.weight", "mapping_network", path)
    latent_dim, mapping_dim = int(first.shape[1]), int(first.shape[0])
    last = _need(mapping, "unshared.0.6.weight", "mapping_network", path)
    style_dim = int(last.shape[0])
    enc_heads = _count(encoder, r"unshared\.(\d+)\.weight")
    if enc_heads != num_heads:
        raise ImportCheckpointError(f"{path}: the mapping network has {num_heads} domain heads but "
                                    f"the style encoder {enc_heads}")
    if len(domains) != num_heads:
        raise ImportCheckpointError(
            f"{path} was trained with {num_heads} domains but --domains gives {len(domains)} "
            f"texts ({', '.join(domains[:4])}{', ...' if len(domains) > 4 else ''})")
    adain_style = int(_need(gen, "decode.0.norm1.fc.weight", "generator", path).shape[1])
    if adain_style != style_dim:
        raise ImportCheckpointError(f"{path}: the generator takes {adain_style}-d styles but the "
                                    f"mapping network makes {style_dim}-d ones")
    try:
        return LanitConfig(domains=domains, img_size=img_size, style_dim=style_dim,
                           latent_dim=latent_dim, max_dim=max_dim,
                           base_dim=None if base_dim == 2 ** 14 // img_size else base_dim,
                           mapping_dim=mapping_dim)
    except ConfigError as err:
        raise ImportCheckpointError(f"{path}: {err}") from None


def _rename_generator(state: dict[str, torch.Tensor], num_decode: int) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if not re.match(r"decode\.\d+\.norm[12]\.fc\.", k)}
    # per decoder block: norm1's fc rows [gamma1; beta1], then norm2's [gamma2; beta2]
    names = [f"decode.{i}.{norm}.fc" for i in range(num_decode) for norm in ("norm1", "norm2")]
    out["style_to_adain.weight"] = torch.cat([state[f"{n}.weight"] for n in names])  # [P, S]
    out["style_to_adain.bias"] = torch.cat([state[f"{n}.bias"] for n in names])  # [P]
    return out


def _rename_mapping(state: dict[str, torch.Tensor], num_domains: int) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in state.items() if k.startswith("shared.")}
    for j, layer in enumerate((0, 2, 4, 6)):  # Linear layers of each per-domain head
        out[f"head_weights.{j}"] = torch.stack(
            [state[f"unshared.{k}.{layer}.weight"].t() for k in range(num_domains)])  # [D, in, out]
        out[f"head_biases.{j}"] = torch.stack(
            [state[f"unshared.{k}.{layer}.bias"][None] for k in range(num_domains)])  # [D, 1, out]
    return out


def _rename_style_encoder(state: dict[str, torch.Tensor], num_domains: int) -> dict[str, torch.Tensor]:
    out = {"trunk." + k[len("shared."):]: v for k, v in state.items() if k.startswith("shared.")}
    out["heads.weight"] = torch.cat([state[f"unshared.{k}.weight"] for k in range(num_domains)])
    out["heads.bias"] = torch.cat([state[f"unshared.{k}.bias"] for k in range(num_domains)])
    return out


def _load(net: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300] or first_line(err)  # torch's lines, joined once
        raise ImportCheckpointError(f"{path}: the {name} does not match the StarGAN v2 layout "
                                    f"inferred from its shapes ({detail})") from None


def convert_official(path: str | os.PathLike, domains: tuple[str, ...]) -> OfficialModel:
    """Read an official `*_nets_ema.ckpt` and return it as lanit-rt networks with their config."""
    path = Path(path)
    states = load_official_state(path)
    config = infer_config(states, tuple(domains), path)
    gen, mapping, encoder = (dict(states[n]) for n in NETS)
    d = config.num_domains
    try:
        renamed = (_rename_generator(gen, config.generator_downsamples + 2),
                   _rename_mapping(mapping, d), _rename_style_encoder(encoder, d))
    except KeyError as err:
        raise ImportCheckpointError(f"{path}: a StarGAN v2 weight is missing ({err.args[0]})") from None
    nets = (Generator(config), MappingNetwork(config), StyleEncoder(config))
    for net, state, name in zip(nets, renamed, NETS):
        _load(net, state, name.replace("_", " "), path)
        net.eval().requires_grad_(False)
    return OfficialModel(config, *nets, source_keys=tuple(sorted(states["_keys"])))


def describe(config: LanitConfig) -> dict[str, Any]:
    """A short summary of an imported architecture (printed by lanit-import)."""
    return {"img_size": config.img_size, "domains": config.num_domains,
            "style_dim": config.style_dim, "latent_dim": config.latent_dim,
            "base_dim": config.stem_dim, "max_dim": config.max_dim,
            "mapping_dim": config.mapping_dim,
            "stargan_v2_widths": config.stem_dim == 2 ** 14 // config.img_size
            and config.max_dim == 512 and config.mapping_dim == 512}
