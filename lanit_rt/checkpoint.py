"""Self-describing LANIT checkpoints.

Inference checkpoint: `model.safetensors` holding the EMA generator, mapping network and style
encoder, the per-domain style tables, and (in the safetensors header) the LanitConfig JSON, so one
file loads with no flags. A copy of the config sits beside it as `config.json` for people.

Resume state: `train_state.pt`, a dict of tensors and plain data that `torch.load(weights_only=True)`
reads (current and EMA nets, discriminator, optimisers, step, RNG states, the training config).

Every file is written to a temporary name in the same folder and renamed into place, so an
interrupted save never leaves a truncated checkpoint.

safetensors is imported by the functions that read or write files, so `import lanit_rt` needs only
torch and numpy: benchmarks/gpu.sh runs the kernels on machines that may have nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lanit_rt.config import ConfigError, LanitConfig
from lanit_rt.errors import first_line
from lanit_rt.networks import Generator, MappingNetwork, StyleEncoder
from lanit_rt.style import mix_styles

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
# /2: the generator's RGB stem is StarGAN v2's 3x3 conv (padding 1); /1 had a 1x1 stem.
FORMAT = "lanit-rt/2"
OLDER_FORMATS = ("lanit-rt/1",)
_PREFIXES = ("generator.", "mapping.", "style_encoder.")


class CheckpointError(RuntimeError):
    """A file is missing, is not a LANIT checkpoint, or does not match the expected model."""


def _umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere os.umask is the only
    way to read it, and it sets a new mask, so a strict one is set for that instant and restored."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def output_file_mode(path: str | os.PathLike) -> int:
    """Permission bits for a file about to be written at `path`: those of the regular file it
    replaces, otherwise what open() would give a new file (0o666 & ~umask)."""
    try:
        existing = os.stat(path)
    except OSError:
        existing = None
    if existing is not None and stat.S_ISREG(existing.st_mode):
        return stat.S_IMODE(existing.st_mode)
    return 0o666 & ~_umask()


def temp_file_beside(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create an empty hidden temporary file in `path`'s folder (which must exist) and return it.

    Being in the same folder (same file system) is what lets publish_file rename it atomically.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished temporary file `tmp` onto `path`, with output_file_mode(path).

    mkstemp creates files 0o600 whatever the umask; without the chmod every published file would
    be private to its owner.
    """
    os.chmod(tmp, output_file_mode(path))
    os.replace(tmp, path)


class OutputPathError(OSError):
    """An output file cannot be written where it was asked for."""


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, not after minutes of work, when `path` could not be written by atomic_write later.

    Makes the parent folder (as atomic_write would), refuses an existing folder at `path`, and
    probes the parent with a temporary file, created and deleted (write permission bits say
    nothing for root or on read-only mounts). Returns `path` as a Path; raises OutputPathError
    naming the folder or file and the reason."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{path} is an existing folder, not a file name")
    folder = path.parent
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputPathError(f"cannot create folder {folder}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create folder {folder}: {err.strerror or err}") from None
    try:
        temp_file_beside(path, suffix=".probe").unlink()
    except OSError as err:
        raise OutputPathError(f"cannot write in folder {folder}: {err.strerror or err}") from None
    return path


def outermost_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet: what creating `folder`
    makes (None when it exists)."""
    missing = None
    for path in (folder.absolute(), *folder.absolute().parents):
        if path.exists():
            break
        missing = path
    return missing


def remove_unused_folders(folder: Path, outermost: Path | None) -> None:
    """Take back the folders that creating `folder` made (up to `outermost`, from outermost_missing)
    where they are still empty: a command that failed before writing anything leaves no trace."""
    if outermost is None:
        return
    for path in (folder.absolute(), *folder.absolute().parents):
        try:
            path.rmdir()  # only an empty folder goes
        except OSError:
            return
        if path == outermost:
            return


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same folder, so atomic).

    The file gets the permissions of the file it replaces, or those a plain open() would give.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "cannot write a file over a folder", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        write(str(tmp))
        publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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

    def weights_digest(self) -> str:
        """A digest of what an exported generator bakes in: the generator's weights and the style
        tables (16 hex digits). Artifacts carry it, so that one exported from other weights than
        its checkpoint (an export left from before more training) is refused, not run."""
        h = hashlib.sha256()
        tensors = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        tensors.update(latent_table=self.latent_table, reference_table=self.reference_table)
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor is None:
                continue
            tensor = tensor.detach().to("cpu")
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            h.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

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
    from safetensors.torch import save_file  # noqa: PLC0415 (see the module docstring)

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
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    file = resolve_model_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a safetensors file: {err}") from None
    if header.get("format") in OLDER_FORMATS:
        raise CheckpointError(older_format_message(file, header["format"]))
    if header.get("format") != FORMAT or "lanit_config" not in header:
        raise CheckpointError(f"{file} is not a LANIT checkpoint (no '{FORMAT}' header)")
    try:
        config = LanitConfig.from_json(header["lanit_config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{file} holds an invalid config: {err}") from None
    try:
        metadata = json.loads(header.get("metadata", "{}"))
    except ValueError as err:
        raise CheckpointError(f"{file} holds invalid metadata JSON: {err}") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{file}: metadata must be a JSON object, got {type(metadata).__name__}")
    return config, metadata


def older_format_message(file: str | os.PathLike, found: str) -> str:
    """The one-line error for a checkpoint written by an older lanit-rt."""
    return (f"{file} is a '{found}' checkpoint from an older lanit-rt (1x1 RGB stem), which this "
            f"version ('{FORMAT}', StarGAN v2's 3x3 stem) cannot load: retrain it, or re-import an "
            "official StarGAN v2 / LANIT checkpoint with lanit-import")


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> LanitModel:
    """Load a checkpoint folder or `model.safetensors` into eval-mode networks on `device`."""
    file = resolve_model_file(path)
    from safetensors.torch import load_file  # noqa: PLC0415

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
    tables = {name: _checked_style_table(tensors, name, config, file) for name in ("latent", "reference")}
    model = LanitModel(config, generator, mapping, style_encoder,
                       latent_table=tables["latent"], reference_table=tables["reference"],
                       metadata=metadata)
    return model.to(device).eval()


def _checked_style_table(tensors: dict[str, torch.Tensor], name: str, config: LanitConfig,
                         file: Path) -> torch.Tensor | None:
    """The `name` style table [D, S] float32, or None when absent.

    Checked here because a wrong shape would otherwise surface only at the first translation, as a
    matmul error, and a non-finite table would translate every image to garbage without an error.
    """
    table = tensors.get(f"style_table.{name}")
    if table is None:
        return None
    expected = [config.num_domains, config.style_dim]
    if list(table.shape) != expected:
        raise CheckpointError(f"{file}: the {name} style table is {list(table.shape)}, but its config "
                              f"needs [num_domains, style_dim] = {expected}")
    if not table.is_floating_point():
        raise CheckpointError(f"{file}: the {name} style table has dtype {table.dtype}, not a float")
    table = table.float()
    if not bool(torch.isfinite(table).all()):
        raise CheckpointError(f"{file}: the {name} style table holds NaN or infinite values")
    return table


def _load_prefixed(net: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str,
                   file: Path) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{file}: weights under '{prefix}' do not match its config: "
                              f"{_first_mismatch(err)}") from None


def _first_mismatch(err: RuntimeError, limit: int = 300) -> str:
    """The first of the mismatches torch's load_state_dict lists under its heading line ("size
    mismatch for w: ..."), with how many more follow; the heading itself says nothing."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = lines[1:] if lines and lines[0].startswith("Error(s) in loading state_dict") else lines
    if not details:
        return first_line(err)
    first = details[0].rstrip(".")
    if len(first) > limit:
        first = first[:limit] + "..."
    return first + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")


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
    reason = not_a_torch_file(file)
    if reason is not None:
        raise CheckpointError(f"{file} is damaged or not a LANIT resume state ({reason})")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad pickles
        raise CheckpointError(f"{file} is damaged or not a LANIT resume state "
                              f"({torch_load_failure(err)})") from None


# How a file that torch.load reads begins: torch.save's zip archive, or a pickle (protocol 2 or
# later: the legacy format, and the released StarGAN v2 / LANIT checkpoints).
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def not_a_torch_file(path: str | os.PathLike) -> str | None:
    """Why the file at `path` cannot be one torch.save wrote, judged by its first bytes; None when
    it may be (torch.load then says what else is wrong)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(TORCH_FILE_STARTS):
        return None
    if not head:
        return "the file is empty"
    return f"neither a zip archive, as torch.save writes, nor a pickle: it starts with {head!r}"


def torch_load_failure(err: Exception) -> str:
    """torch.load's error as `Type: cause`, its first sentence only. For a file the safe unpickler
    refuses, torch's first lines are about its defaults (and suggest weights_only=False, unsafe on a
    file of unknown origin); the cause follows "WeightsUnpickler error:"."""
    text, marker = str(err), "WeightsUnpickler error:"
    if marker in text:
        cause = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
    else:
        cause = first_line(err)
    return f"{type(err).__name__}: {cause.split('. ')[0]}"[:200]
