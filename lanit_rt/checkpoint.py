"""Self-describing LANIT checkpoints.

Inference checkpoint: `model.safetensors` holding the EMA generator, mapping network and style
encoder, the per-domain style tables, and (in the safetensors header) the LanitConfig JSON, so one
file loads with no flags. A copy of the config sits beside it as `config.json` for people.

Resume state: `train_state.pt`, a dict of tensors and plain data that `torch.load(weights_only=True)`
reads (current and EMA nets, discriminator, optimisers, step, RNG states, the training config).

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted save never leaves a truncated checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from lanit_rt.config import ConfigError, LanitConfig
from lanit_rt.networks import Generator, MappingNetwork, StyleEncoder
from lanit_rt.style import mix_styles

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT = "lanit-rt/1"
_PREFIXES = ("generator.", "mapping.", "style_encoder.")


class CheckpointError(RuntimeError):
    """A file is missing, is not a LANIT checkpoint, or does not match the expected model."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


@dataclass
class LanitModel:
    """Everything inference needs: config, EMA networks and per-domain style tables ([D, S])."""

    config: LanitConfig
    generator: Generator
    mapping: MappingNetwork | None = None
    style_encoder: StyleEncoder | None = None
    latent_table: torch.Tensor | None = None
    reference_table: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def style_table(self) -> torch.Tensor:
        """The table used for text-only targets: the latent (mapping-network) table if present."""
        table = self.latent_table if self.latent_table is not None else self.reference_table
        if table is None:
            raise CheckpointError("this checkpoint has no per-domain style table")
        return table

    def domain_style(self, domain_weights: torch.Tensor) -> torch.Tensor:
        """Multi-hot target weights [N, D] -> style [N, S] by the exact mixing rule."""
        return mix_styles(self.style_table.to(domain_weights.device), domain_weights)

    def to(self, device: torch.device | str) -> "LanitModel":
        for net in (self.generator, self.mapping, self.style_encoder):
            if net is not None:
                net.to(device)
        return self

    def eval(self) -> "LanitModel":
        for net in (self.generator, self.mapping, self.style_encoder):
            if net is not None:
                net.eval().requires_grad_(False)
        return self


def save_checkpoint(path: str | os.PathLike, config: LanitConfig, generator: Generator,
                    mapping: MappingNetwork | None = None, style_encoder: StyleEncoder | None = None,
                    latent_table: torch.Tensor | None = None,
                    reference_table: torch.Tensor | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` (+ `config.json`) into the folder `path`; returns the file path."""
    folder = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, net in zip(_PREFIXES, (generator, mapping, style_encoder)):
        if net is not None:
            for key, value in _unwrap(net).state_dict().items():
                tensors[prefix + key] = value.detach().cpu().contiguous()
    for name, table in (("latent", latent_table), ("reference", reference_table)):
        if table is not None:
            expected = (config.num_domains, config.style_dim)
            if tuple(table.shape) != expected:
                raise CheckpointError(f"{name} style table must be {list(expected)}, got {list(table.shape)}")
            tensors[f"style_table.{name}"] = table.detach().float().cpu().contiguous()
    header = {
        "format": FORMAT,
        "lanit_config": config.to_json(),
        "metadata": json.dumps(metadata or {}, sort_keys=True, default=str),
    }
    file = folder / MODEL_FILE
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata=header))
    atomic_write_text(folder / CONFIG_FILE, config.to_json() + "\n")
    return file


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A checkpoint folder or file -> the `model.safetensors` path (with clear errors)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f"no LANIT checkpoint at {path}")
    return path


def read_checkpoint_config(path: str | os.PathLike) -> tuple[LanitConfig, dict[str, Any]]:
    """Read only the header: (config, metadata). Raises CheckpointError for foreign files."""
    file = resolve_model_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a safetensors file: {err}") from None
    if header.get("format") != FORMAT or "lanit_config" not in header:
        raise CheckpointError(f"{file} is not a LANIT checkpoint (no '{FORMAT}' header)")
    try:
        config = LanitConfig.from_json(header["lanit_config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{file} holds an invalid config: {err}") from None
    return config, json.loads(header.get("metadata", "{}"))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> LanitModel:
    """Load a checkpoint folder or `model.safetensors` into eval-mode networks on `device`."""
    file = resolve_model_file(path)
    config, metadata = read_checkpoint_config(file)
    tensors = load_file(str(file), device="cpu")
    generator = Generator(config)
    _load_prefixed(generator, tensors, "generator.", file)
    mapping = style_encoder = None
    if any(k.startswith("mapping.") for k in tensors):
        mapping = MappingNetwork(config)
        _load_prefixed(mapping, tensors, "mapping.", file)
    if any(k.startswith("style_encoder.") for k in tensors):
        style_encoder = StyleEncoder(config)
        _load_prefixed(style_encoder, tensors, "style_encoder.", file)
    model = LanitModel(config, generator, mapping, style_encoder,
                       latent_table=tensors.get("style_table.latent"),
                       reference_table=tensors.get("style_table.reference"),
                       metadata=metadata)
    return model.to(device).eval()


def _load_prefixed(net: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
                   file: Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{file}: weights under '{prefix}' do not match its config: {first}") from None


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / torch.compile wrappers so state_dict keys stay plain."""
    net = getattr(net, "module", net)
    return getattr(net, "_orig_mod", net)


def save_train_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the resume state (tensors + plain data only) atomically to `path/train_state.pt`."""
    file = Path(path) / TRAIN_STATE_FILE
    atomic_write(file, lambda tmp: torch.save(state, tmp))
    return file


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path)
    if file.is_dir():
        file = file / TRAIN_STATE_FILE
    if not file.exists():
        raise CheckpointError(f"no resume state at {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad pickles
        raise CheckpointError(f"{file} is not a LANIT resume state: {err}") from None
