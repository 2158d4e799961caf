"""Test-session setup. Environment variables must be set before triton / huggingface are imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lanit_rt.config import LanitConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> LanitConfig:
    """A model small enough for the Triton interpreter and quick CPU tests."""
    return LanitConfig(domains=("blond hair", "black hair", "beard"), img_size=32, base_dim=8,
                       max_dim=32, style_dim=16, latent_dim=8, mapping_dim=32)


@pytest.fixture
def refuse_new_files(monkeypatch):
    """`refuse_new_files(folder)`: from then on no new file can be made in `folder`, as if it were
    read-only. chmod does not stop root (CI runs as root), so tempfile.mkstemp, through which every
    atomic write and write probe goes, is refused there instead."""
    import errno
    import tempfile
    from pathlib import Path

    mkstemp = tempfile.mkstemp
    blocked: set[Path] = set()

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() in blocked:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return lambda folder: blocked.add(Path(folder).resolve())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_labeler(tmp_path_factory) -> str:
    """A `--labeler` value for a tiny randomly initialised open_clip CLIP: a weights file with its
    architecture in a JSON sidecar, so subprocesses (torchrun) load it without registration."""
    import json

    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "lanit-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(folder / "lanit-tiny-clip.json")
    torch.manual_seed(4321)
    model = open_clip.create_model("lanit-tiny-clip", pretrained=None)
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    (folder / "tiny.safetensors.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    return str(weights)
