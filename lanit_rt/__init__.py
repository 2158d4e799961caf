"""lanit-rt runtime: config, networks, checkpoints, style tables and the Translator API.

This package imports nothing from training/ or lanit_export/ at import time (export=True in
Translator.from_checkpoint calls the ONNX exporter lazily).
"""

from lanit_rt.checkpoint import (
    CheckpointError,
    LanitModel,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from lanit_rt.config import ConfigError, LanitConfig
from lanit_rt.networks import Discriminator, Generator, MappingNetwork, StyleEncoder
from lanit_rt.style import latent_style_table, mix_styles, normalize_domain_weights, reference_style_table
from lanit_rt.translator import Translator
from lanit_rt.version import __version__  # noqa: F401 (lanit_rt.__version__)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Discriminator",
    "Generator",
    "LanitConfig",
    "LanitModel",
    "MappingNetwork",
    "StyleEncoder",
    "Translator",
    "latent_style_table",
    "load_checkpoint",
    "mix_styles",
    "normalize_domain_weights",
    "read_checkpoint_config",
    "reference_style_table",
    "save_checkpoint",
]
