"""The training configuration: plain data with typed `key=value` overrides.

`TrainConfig` holds everything a run needs besides the architecture, which it derives as a
`LanitConfig` (`model_config()`), so the checkpoint never depends on these flags to load.
Schedules (diversity decay, EMA warm-up) are functions of the step, never mutations of the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from lanit_rt.config import ARCHS, ConfigError, LanitConfig
from training.data import AUGMENTATIONS
from training.labeling.pseudo_labels import LABEL_MODES, TOPK_MODES


# The objectives by name. lanit-official follows the released LANIT code (KU-CVLAB/LANIT, step 1 +
# step 2 scripts): adversarial BCE averaged over every active (sample, domain) logit, R1 on the sum
# of the active logits, diversity in the latent step only, the domain-regularisation loss
# -log relu(cos(G(x, s_y), t_k)) for one removed target domain k only while prompts are learned,
# lr 1e-4 for every net, He init. lanit-rt: per-sample averages, diversity in both steps, the
# two-sided BCE domain loss from step 0 with weight 1, lr 2e-4, PyTorch's default init.
RECIPES: dict[str, dict[str, Any]] = {
    "lanit-official": {"lr": 1e-4, "mapping_lr": 1e-4, "lambda_dl": 0.5},
    "lanit-rt": {"lr": 2e-4, "mapping_lr": 2e-4, "lambda_dl": 1.0},
}

# The embedded default must finish within 13 minutes on 2 CPU cores, its install included (pip took
# 1.5-1.8 minutes on the machines measured). The run's own budget counts from the command's start,
# so labelling, the first compile and the closing evaluation are inside it (`max_minutes`).
DEFAULT_DATA_MAX_MINUTES = 11.0
# Its steps: as many as a fast 2-core machine makes in that budget (4.5-4.7 steps/s on a Xeon
# with AMX). Slower machines stop at the budget, about 1,000 steps, no worse off than a 1,000-step
# run (A/B in benchmarks/RESULTS.md). Other data default to STEPS.
DEFAULT_DATA_STEPS = 3000
STEPS = 1000
# The embedded default's learning rates: twenty times the official 1e-4, which is tuned for 100 k
# steps; in the default run's 1,000-3,000 steps 1e-4 leaves blurred generic faces (A/B at equal steps in
# benchmarks/RESULTS.md). Used wherever lr / mapping_lr are not given; other data keep the recipe's.
DEFAULT_DATA_LR = 2e-3
# The embedded default's identity weight: without the term every latent translation comes out in
# one skin tone per domain (the style sets it), so no source is recognisable; with it the sources
# keep theirs. 10 rather than 5, over four seeds at 3,000 steps: content 0.317 vs 0.309 and top-1
# accuracy 0.591 vs 0.559 (higher or equal in every seed), for domain accuracy 0.762 vs 0.778 and
# mFD 0.874 vs 0.844, both within the seeds' noise (A/B in benchmarks/RESULTS.md). Other data keep
# the official 0.
DEFAULT_DATA_LAMBDA_ID = 10.0
LANIT_LITE_DL_SIZE = 128
# The step at which a CPU run's compiled blocks take over from its eager start, where the compile
# is not in the caches yet (`compile_after`): about the steps the 2-core Zen 4 machine of
# benchmarks/RESULTS.md trains (2.4-2.9 steps/s) while a cold compile runs in the child (104-124 s).
COMPILE_AFTER = 300


@dataclass(frozen=True)
class TrainConfig:
    # data and domains (None data -> the embedded Twemoji person set and its default domains)
    data: str | None = None
    domains: tuple[str, ...] | None = None
    out: str = "runs/default"
    # architecture: the embedded default is sized to learn within minutes on 2 CPU cores (stem 16,
    # max 64: 2.5x the steps/s of 32/128, benchmarks/RESULTS.md); for real data pass
    # --img-size 128/256 and --set arch=stargan-v2 (the official widths, which then replace
    # base_dim, max_dim and mapping_dim)
    arch: str | None = None
    img_size: int = 32
    base_dim: int | None = 16
    max_dim: int = 64
    style_dim: int = 64
    latent_dim: int = 16
    mapping_dim: int = 256
    # the objective: "lanit-official" follows the released LANIT code (RECIPES), "lanit-rt" is
    # this package's earlier variant, kept for A/B comparisons (benchmarks/RESULTS.md)
    recipe: str = "lanit-official"
    # optimisation: LANIT / StarGAN v2 values; None -> the recipe's value (RECIPES), or
    # DEFAULT_DATA_LR for the embedded default data. steps: None -> DEFAULT_DATA_STEPS for the
    # embedded default data, else STEPS
    steps: int | None = None
    batch_size: int = 8
    lr: float | None = None
    mapping_lr: float | None = None
    beta1: float = 0.0
    beta2: float = 0.99
    weight_decay: float = 1e-4
    ema_beta: float = 0.999
    lambda_r1: float = 1.0
    # lazy R1 (StyleGAN2): the penalty on every r1_every-th step only, weighted r1_every times
    # (1: the official every-step R1; A/B in benchmarks/RESULTS.md)
    r1_every: int = 16
    lambda_sty: float = 1.0
    lambda_ds: float = 1.0
    lambda_cyc: float = 1.0
    # identity term (CycleGAN's; not in LANIT or StarGAN v2): in the latent step, a source rendered
    # in a random latent style of its own domain(s) must reproduce itself (L1). 0: off, the
    # official objective; None -> DEFAULT_DATA_LAMBDA_ID for the embedded default data, else 0
    lambda_id: float | None = None
    lambda_dl: float | None = None  # None -> the recipe's (LANIT's lambda_p 0.5 / lanit-rt 1.0)
    # training-image augmentation (training.data.augment_batch): "resized-crop" (StarGAN v2's),
    # "shift" (whole pixels: no resampling blur at small sizes; A/B in benchmarks/RESULTS.md)
    # or "flip"
    augment: str = "resized-crop"
    ds_decay_steps: int | None = None  # None -> decay the diversity weight to 0 over all steps
    # pseudo-labels
    labeler: str = "lanit-lite"
    # None -> "topk" (k = 1) for the embedded default, whose six domains are mutually exclusive
    # hair / beard attributes (lanit-lite's labels there: macro F1 0.84 top-1 vs 0.72 adaptive),
    # and LANIT's adaptive base-prompt rule otherwise
    label_mode: str | None = None
    topk: int = 1
    threshold: float = 0.0
    template_set: str | None = None  # None -> "emoji" for the default data, "face" otherwise
    templates_file: str | None = None
    base_prompt: str | None = None
    # input size at which the domain-regularisation loss encodes generated images. None: the
    # labeler's own size, except 128 for lanit-lite: its tower is convolutional, and at 128 the
    # default run makes 555 steps in 12 minutes against 399 at 224, with domain accuracy 0.647 vs
    # 0.117 (benchmarks/RESULTS.md), although the committed heads label less well at 128 (persons
    # macro F1 0.42 vs 0.68). ViT labelers take only their own size (another stops the run at once).
    dl_image_size: int | None = None
    # stage 2: prompt learning through the domain-regularisation loss
    stage: int = 1
    prompt_start: int | None = None  # None -> half of the steps
    prompt_lr: float = 1e-5
    relabel_every: int = 50  # stage 2: steps between relabellings; 0: keep the first labels
    # bookkeeping
    seed: int = 0
    device: str = "auto"  # auto (a GPU when PyTorch sees one), cpu, cuda or cuda:N
    # torch.compile of the generator's blocks and the style encoder's trunk (training.acceleration):
    # the same arithmetic, fused, 1.3-1.5x the steps/s at the default 32 px on 2 CPU cores after a
    # 30-115 s first compile (beside the first steps: `compile_after`). None (`--set
    # compile=auto`): on for single-process CPU runs of 1,000 steps or more, where torch.compile
    # works (a one-line warning otherwise)
    compile: bool | None = None
    # Where a CPU run compiles (one process): its steps before this one train eagerly with one
    # thread fewer, while a child process compiles the blocks on the spare core and fills inductor's
    # caches (training.background_compile); at this step the trainer compiles from those caches in
    # seconds and trains on every thread. A fixed step, so a seed's run does not depend on how long
    # the compile took. 0: compile before the first step. None (`--set compile_after=auto`):
    # COMPILE_AFTER, or 1 where inductor's caches already hold this run's compile (a child left its
    # marker there), so a repeated run does not train 300 steps eagerly; the run's
    # train_config.json records the step it chose, and `--set compile_after=<that step>` repeats it.
    compile_after: int | None = None
    # Wall-clock cap on the whole run (minutes), counted from the start of `python -m training.run`
    # (of `train()` when called from Python): loading, labelling and the first compile use it up too,
    # and training stops early enough to leave the closing evaluation its time. The run then saves
    # and ends as if finished. None: no cap, except for the embedded default data
    # (DEFAULT_DATA_MAX_MINUTES).
    max_minutes: float | None = None
    # Steps between metrics lines, sample grids and saves; 0 turns the periodic one off. The last
    # step is always logged, sampled and saved.
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 500
    num_style_z: int = 1000  # latents averaged into the per-domain latent style table (>= 1)
    cache_dir: str | None = None  # None -> ~/.cache/lanit-rt

    def __post_init__(self) -> None:
        if self.domains is not None:
            object.__setattr__(self, "domains", tuple(self.domains))
            if len(self.domains) < 2:
                raise ConfigError(f"LANIT needs at least 2 domain texts, got {list(self.domains)}")
            if "path" in self.domains:
                raise ConfigError("'path' cannot be a domain text: it heads the image column of "
                                  "pseudo_labels.csv")
        elif self.data is not None:  # only the embedded default data comes with its own domains
            raise ConfigError("--domains (or --domains-file) is required with --data")
        if not self.out.strip():  # Path("") is the working folder: the run would land there
            raise ConfigError("out must name a folder, got an empty one")
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        if self.arch is not None:
            if self.arch not in ARCHS:
                raise ConfigError(f"arch must be one of {sorted(ARCHS)} (or none), got {self.arch!r}")
            for key, value in ARCHS[self.arch].items():  # the named architecture sets its widths
                object.__setattr__(self, key, value)
        if self.data is None:
            for key in ("lr", "mapping_lr"):
                if getattr(self, key) is None:
                    object.__setattr__(self, key, DEFAULT_DATA_LR)
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_DATA_STEPS if self.data is None else STEPS)
        if self.lambda_id is None:
            object.__setattr__(self, "lambda_id", DEFAULT_DATA_LAMBDA_ID if self.data is None else 0.0)
        for key, value in RECIPES[self.recipe].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key in ("lambda_r1", "lambda_sty", "lambda_ds", "lambda_cyc", "lambda_id", "lambda_dl"):
            if not getattr(self, key) >= 0:  # a negative weight would flip its term, or turn it off
                raise ConfigError(f"{key} must be 0 (off) or more, got {getattr(self, key)}")
        if self.ds_decay_steps is not None and self.ds_decay_steps < 1:
            raise ConfigError(f"ds_decay_steps must be at least 1 (or unset: all steps), "
                              f"got {self.ds_decay_steps}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be positive")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.label_mode not in (None, *LABEL_MODES):
            raise ConfigError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ConfigError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        for key in ("log_every", "sample_every", "save_every", "relabel_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be 0 (off) or a positive number of steps, "
                                  f"got {getattr(self, key)}")
        if self.compile_after is not None and self.compile_after < 0:
            raise ConfigError(f"compile_after must be 0 (compile first), a step or auto, got {self.compile_after}")
        if self.r1_every < 1:
            raise ConfigError(f"r1_every must be at least 1, got {self.r1_every}")
        if self.num_style_z < 1:
            raise ConfigError(f"num_style_z must be at least 1, got {self.num_style_z}")
        if self.topk < 1:
            raise ConfigError(f"topk must be at least 1, got {self.topk}")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"threshold must be a finite number, got {self.threshold}")
        if self.label_rule in TOPK_MODES and self.domains is not None and self.topk > len(self.domains):
            raise ConfigError(f"topk must be at most the number of domains ({len(self.domains)}), "
                              f"got {self.topk}")
        if self.dl_image_size is not None and not 32 <= self.dl_image_size <= 1024:
            raise ConfigError(f"dl_image_size must be between 32 and 1024 pixels (or unset for the "
                              f"labeler's own size), got {self.dl_image_size}")
        if self.max_minutes is not None and self.max_minutes < 0:
            raise ConfigError(f"max_minutes must be 0 or more, got {self.max_minutes}")
        if not (self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def model_config(self, domains: tuple[str, ...]) -> LanitConfig:
        return LanitConfig(domains=domains, img_size=self.img_size, style_dim=self.style_dim,
                           latent_dim=self.latent_dim, base_dim=self.base_dim, max_dim=self.max_dim,
                           mapping_dim=self.mapping_dim)

    @property
    def time_budget_s(self) -> float | None:
        if self.max_minutes is not None:
            return 60.0 * self.max_minutes
        return 60.0 * DEFAULT_DATA_MAX_MINUTES if self.data is None else None

    @property
    def label_rule(self) -> str:
        """The labelling mode in effect (`label_mode` with its data-dependent default resolved)."""
        if self.label_mode is not None:
            return self.label_mode
        return "topk" if self.data is None else "adaptive"

    @property
    def template_rule(self) -> str:
        """The prompt template set in effect (`template_set` with its data-dependent default)."""
        if self.template_set is not None:
            return self.template_set
        return "emoji" if self.data is None else "face"

    def resolved(self) -> "TrainConfig":
        """This config with every data-dependent default spelled out (what --dry-run prints)."""
        budget = self.time_budget_s
        return self.replace(label_mode=self.label_rule, template_set=self.template_rule,
                            max_minutes=None if budget is None else budget / 60,
                            prompt_start=self.prompt_start_step)

    def dl_size(self, labeler_size: int) -> int:
        """`dl_image_size` resolved for a labeler whose own input size is `labeler_size`."""
        if self.dl_image_size is not None:
            return self.dl_image_size
        from training.labeling.vl import is_lanit_lite

        return min(labeler_size, LANIT_LITE_DL_SIZE) if is_lanit_lite(self.labeler) else labeler_size

    @property
    def ds_decay_span(self) -> int:
        """Steps over which the diversity weight decays to 0 (`ds_decay_steps`, or all steps)."""
        return self.steps if self.ds_decay_steps is None else self.ds_decay_steps

    @property
    def prompt_start_step(self) -> int:
        return self.steps // 2 if self.prompt_start is None else self.prompt_start

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.domains is not None:
            out["domains"] = list(self.domains)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


# The keys whose None means "auto", so that `--set key=auto` says it too.
AUTO_KEYS = ("compile", "compile_after")


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value converted to the field's type). Raises ConfigError."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    hints = typing.get_type_hints(TrainConfig)
    if key not in hints:
        raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(hints)}")
    return key, _convert(raw.strip(), hints[key], key)


def _convert(raw: str, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and (raw.lower() in ("none", "null", "")
                                   or (key in AUTO_KEYS and raw.lower() == "auto")):
            return None
        return _convert(raw, inner[0], key)
    if origin is tuple:
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    try:
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key} expects {hint.__name__}, got {raw!r}") from None
    return raw
