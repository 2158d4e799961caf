"""The architecture of a LANIT model as one frozen, JSON-serialisable dataclass.

Every checkpoint and every exported artifact carries this object, so nothing that loads a model ever
needs the flags that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

MIN_IMG_SIZE = 32
MAX_IMG_SIZE = 256
# Architectures by name: the widths each one sets (base_dim None = 2**14 // img_size).
ARCHS: dict[str, dict[str, Any]] = {
    # StarGAN v2 / LANIT as released: stem 2**14 // img_size, channels capped at 512, mapping 512 wide.
    "stargan-v2": {"base_dim": None, "max_dim": 512, "mapping_dim": 512},
}


class ConfigError(ValueError):
    """A LanitConfig (or the JSON it was read from) does not describe a valid model."""


@dataclass(frozen=True)
class LanitConfig:
    """Architecture of the generator, mapping network, style encoder and discriminator.

    `base_dim` is the channel count after the RGB stem; StarGAN v2 uses `2**14 // img_size` (64 at
    256 px). Channels double at each down-sampling block up to `max_dim`. The trunk goes down to 16x16
    in the generator and 4x4 (then 1x1) in the style encoder and discriminator.
    """

    domains: tuple[str, ...]
    img_size: int = 256
    style_dim: int = 64
    latent_dim: int = 16
    base_dim: int | None = None
    max_dim: int = 512
    mapping_dim: int = 512
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        if len(self.domains) < 2:
            raise ConfigError(f"LANIT needs at least 2 domain texts, got {list(self.domains)}")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"domain texts must be unique, got {list(self.domains)}")
        if any(not d.strip() for d in self.domains):
            raise ConfigError("domain texts must be non-empty")
        size = self.img_size
        if not (MIN_IMG_SIZE <= size <= MAX_IMG_SIZE) or size & (size - 1):
            raise ConfigError(
                f"img_size must be a power of two in [{MIN_IMG_SIZE}, {MAX_IMG_SIZE}], got {size}"
            )
        for name in ("style_dim", "latent_dim", "max_dim", "mapping_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.base_dim is not None and self.base_dim <= 0:
            raise ConfigError(f"base_dim must be positive, got {self.base_dim}")

    @classmethod
    def for_arch(cls, arch: str, domains: tuple[str, ...] | list[str], img_size: int = 256,
                 style_dim: int = 64, latent_dim: int = 16) -> "LanitConfig":
        """The config of a named architecture (ARCHS) at `img_size`, e.g. "stargan-v2": the
        official StarGAN v2 / LANIT widths (stem 2**14 // img_size, max 512, mapping 512)."""
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
        return cls(domains=tuple(domains), img_size=img_size, style_dim=style_dim,
                   latent_dim=latent_dim, **ARCHS[arch])

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def stem_dim(self) -> int:
        """Channels after the RGB stem (the resolved `base_dim`)."""
        return self.base_dim if self.base_dim is not None else 2**14 // self.img_size

    @property
    def generator_downsamples(self) -> int:
        """Number of down/up-sampling blocks in the generator (to a 16x16 bottleneck)."""
        return int(math.log2(self.img_size)) - 4

    def domain_index(self, name: str) -> int:
        try:
            return self.domains.index(name)
        except ValueError:
            raise KeyError(f"unknown domain {name!r}{self._domain_hint(name)}; known domains: "
                           f"{list(self.domains)}") from None

    def _domain_hint(self, name: str) -> str:
        """What the caller may have meant: a name differing in case or spaces, or several names."""
        def fold(text: str) -> str:
            return " ".join(text.split()).casefold()

        near = next((d for d in self.domains if fold(d) == fold(name)), None)
        if near is not None:
            return f" (did you mean {near!r}? names match exactly)"
        parts = [" ".join(part.split()) for part in name.split(",")]
        if len(parts) > 1 and all(part in self.domains for part in parts):
            return f" (several domains are a list: {parts!r})"
        return ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["domains"] = list(self.domains)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LanitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LanitConfig keys {unknown}; known keys: {sorted(known)}")
        if "domains" not in data:
            raise ConfigError("LanitConfig needs 'domains'")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "LanitConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)
