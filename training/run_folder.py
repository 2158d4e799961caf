"""The run folder's bookkeeping outside the step: checked before any heavy work, saved into with
one-line errors, and the facts a resume must find again (the images' digest, the logged steps)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError

from lanit_rt.checkpoint import (
    MODEL_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    OutputPathError,
    check_output_file,
)
from lanit_rt.config import ConfigError
from lanit_rt.errors import first_line


# Written when a run starts: what marks a folder as a training run's (data scans leave those out).
TRAIN_CONFIG_FILE = "train_config.json"


def read_train_config(file: Path, advice: str = "") -> dict:
    """A run's train_config.json as a dict; ConfigError (one line, `advice` after it) when it is not
    UTF-8 JSON holding an object."""
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON ({err}){advice}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{file} holds a JSON {type(settings).__name__}, not the run's settings "
                          f"(an object){advice}")
    return settings


def run_origin(run_dir: Path, out: str | None) -> Path | None:
    """The working folder of the `training.run` that wrote `run_dir`: train_config.json keeps --out
    as it was given, so a relative `out` that ends the resolved run path gives the folder before it."""
    if not out or Path(out).is_absolute():
        return None
    parts = Path(out).parts
    resolved = run_dir.resolve()
    if ".." in parts or not parts or len(parts) >= len(resolved.parts) or resolved.parts[-len(parts):] != parts:
        return None
    return resolved.parents[len(parts) - 1]


def recorded_path_candidates(recorded: str, run_dir: Path, origin: Path | None) -> list[Path]:
    """Where a path train_config.json records as it was given may be now: itself when absolute;
    else from the folder the run was started in, then the current folder, then each folder above
    the run folder (the filesystem root excluded). The start folder comes first: a folder of the
    same name under the current one is another folder."""
    given = Path(recorded).expanduser()
    if given.is_absolute():
        return [given]
    bases = [*([origin] if origin is not None else []), Path.cwd(),
             *[p for p in run_dir.resolve().parents if p != Path(p.anchor)]]
    return list(dict.fromkeys(base / given for base in bases))


class RunError(RuntimeError):
    """The run folder cannot be used as asked: not creatable or writable, already holding a run, or
    a save that failed part-way (disk full)."""


def resume_command(out: Path) -> str:
    """The command that continues the run in `out`: its settings come back from the folder."""
    return f"python -m training.run --out {shlex.quote(str(out))} --resume"


def prepare_out_folder(out: Path, resume: bool) -> None:
    """Create the run folder and check that it takes files, before any heavy work. A new run refuses
    a folder that holds a saved run (resume state or checkpoint); `resume` needs the resume state.
    A folder with only the files of a run that never saved is started over. Raises RunError or
    CheckpointError."""
    if out.exists() and not out.is_dir():
        raise RunError(f"output folder {out} is an existing file; choose another --out")
    if resume and not (out / TRAIN_STATE_FILE).is_file():
        raise CheckpointError(f"no resume state in {out} ({TRAIN_STATE_FILE} is missing); "
                              "run without --resume to start a new run")
    if not resume and (out / TRAIN_STATE_FILE).exists():
        raise RunError(f"{out} already holds a training run; pass --resume to continue it, "
                       "choose another --out, or delete the folder to start over")
    if not resume and (out / MODEL_FILE).exists():
        raise RunError(f"{out} already holds a checkpoint ({MODEL_FILE}) and no resume state; "
                       "choose another --out, or delete the folder to start over")
    try:
        check_output_file(out / MODEL_FILE)
    except OutputPathError as err:
        raise RunError(f"unusable output folder: {err}") from None


@contextlib.contextmanager
def saving(file: Path):
    """Turn a failed write of `file` (disk full, folder gone or read-only) into a RunError that names
    it. atomic_write renames a file into place only once it is complete, so whatever was at `file`
    before is still there, whole."""
    existed = file.exists()
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, SafetensorError) as err:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            reason = "no space left on device"
        elif isinstance(err, OSError) and err.strerror:
            reason = err.strerror
        else:  # torch.save on a full disk: "[enforce fail at inline_container.cc:...] . unexpected pos"
            reason = first_line(err)
        kept = (f"the previous {file.name} there is intact" if existed
                else f"no {file.name} was written")
        raise RunError(f"could not save {file} ({reason}); is the disk full or the folder read-only? "
                       f"{kept}") from err


def logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; a line cut short (the run was killed while writing it)
    counts as logged after any saved state, so a resume drops it."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def images_digest(paths: Sequence[Path]) -> str:
    """A digest of the training images' file names and sizes, in order: what a resume must find
    again (contents are not read; a folder of the same files moved elsewhere still matches)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{Path(path).name}\0{os.stat(path).st_size}\n".encode())
    return h.hexdigest()[:16]
