"""The LANIT training loop, readable top to bottom.

One iteration (StarGAN v2 order): D on a latent-guided fake, D on a reference-guided fake, G
latent-guided step (G, F, E updated), G reference-guided step (G updated); then the EMA copies.
Targets are multi-hot pseudo-labels from a vision-language model; samples with no active domain
("slack") never enter a batch. Stage 2 also learns the prompt context vectors through the
domain-regularisation loss.

Several processes (torchrun) each draw their own batches; gradients are averaged with one bucketed
all-reduce per optimiser step (see `average_gradients`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from lanit_rt.checkpoint import (
    FORMAT as CHECKPOINT_FORMAT,
    MODEL_FILE,
    OLDER_FORMATS,
    TRAIN_STATE_FILE,
    CheckpointError,
    atomic_write_text,
    load_train_state,
    older_format_message,
    outermost_missing,
    remove_unused_folders,
    save_checkpoint,
    save_train_state,
)
from lanit_rt.config import ConfigError, LanitConfig
from lanit_rt.errors import describe
from lanit_rt.networks import Discriminator, Generator, MappingNetwork, StyleEncoder
from lanit_rt.style import latent_style_table, mix_styles, reference_style_table
from training import losses
from training.acceleration import (compile_blocks, compiled_blocks, import_cpp_extension_quietly,
                                   keep_freed_memory, probe_compile, release_freed_memory,
                                   should_compile)
from training.background_compile import BackgroundCompile, compiled_before, record_block_calls
from training.config import COMPILE_AFTER, TrainConfig
from training.data import DataError, ImageSet, check_images, find_images
from training.distributed import average_gradients, init_distributed
from training.grid import save_sample_grid
from training.kernel_batching import batched_kernel_builds
from training.run_folder import (TRAIN_CONFIG_FILE, RunError, images_digest, logged_step,
                                 prepare_out_folder, resume_command, saving)

# Settings a resumed run may change: when and where it stops, logs and saves, and where the same
# data lives (the images themselves are checked by count and digest). Any other change would make
# train_config.json and the saved labels describe another run than the one resumed.
RESUMABLE_CHANGES = ("steps", "max_minutes", "log_every", "sample_every", "save_every", "device",
                     "cache_dir", "out", "data", "compile", "compile_after")
METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "pseudo_labels.csv"
PROMPTS_FILE = "prompts.safetensors"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C in the training loop, raised after the state was saved at `step`."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


class NothingToTrain(Exception):
    """--resume of a run already at or past --steps: nothing was trained, and nothing written."""

    def __init__(self, out: Path, step: int, steps: int):
        super().__init__(f"the run in {out} is already at step {step} of --steps {steps}: nothing to "
                         "train, nothing changed; pass a larger --steps to continue it")


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """While the loop runs, the first Ctrl-C (SIGINT) only sets the yielded event: the step under
    way finishes, so the state saved for --resume is that of a step boundary (an update half done
    and the batch sampler already advanced would make the resumed run differ). A second Ctrl-C
    raises KeyboardInterrupt at once. Off the main thread (no signal handlers there) the event is
    never set and Ctrl-C behaves as usual."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        tqdm.write("stopping after this step to save it (Ctrl-C again to stop at once, unsaved)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


class PhaseClock:
    """Wall time per phase of the training step, summed over steps (benchmarks/train_step.py).

    `with clock("name"):` times a phase; phases nest, and time is counted to the innermost one, so
    the phases add up to the step. Off (`enabled=False`, the default) it costs one branch. On a GPU
    each boundary synchronises the device, so kernels are charged to the phase that queued them."""

    def __init__(self, enabled: bool = False, device: torch.device | None = None):
        self.enabled = enabled
        self.sync = enabled and device is not None and device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def _charge(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.totals[name] = self.totals.get(name, 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()


# ----------------------------------------------------------------------------- networks

@dataclass
class Nets:
    generator: Generator
    mapping: MappingNetwork
    style_encoder: StyleEncoder
    discriminator: Discriminator | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {"generator": self.generator, "mapping": self.mapping,
                 "style_encoder": self.style_encoder}
        if self.discriminator is not None:
            named["discriminator"] = self.discriminator
        return named


def he_init(net: torch.nn.Module) -> None:
    """He (Kaiming normal, fan_in, ReLU gain) on every conv / linear weight, zero biases: the
    official StarGAN v2 / LANIT init. The mapping network's per-domain heads are [D, in, out]
    stacks of Linear weights, each with fan_in = in; InstanceNorm affines keep (1, 0)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
        if isinstance(net, MappingNetwork):
            for weight, bias in zip(net.head_weights, net.head_biases):
                weight.normal_(0.0, math.sqrt(2.0 / weight.shape[1]))
                bias.zero_()


def build_nets(config: LanitConfig, device: torch.device,
               init: str = "he") -> tuple[Nets, Nets]:
    """(trained nets incl. D, EMA copies of G/F/E in eval mode without grads).

    init "he": He init (official); "default": PyTorch's. The EMA copies start as copies of the
    trained nets (the official code leaves them at PyTorch's init; see README)."""
    nets = Nets(Generator(config), MappingNetwork(config), StyleEncoder(config), Discriminator(config))
    for net in nets.modules().values():
        if init == "he":
            he_init(net)
        elif init != "default":
            raise ValueError(f"init must be 'he' or 'default', got {init!r}")
        net.to(device)
    ema = Nets(*(copy.deepcopy(n).eval().requires_grad_(False)
                 for n in (nets.generator, nets.mapping, nets.style_encoder)))
    return nets, ema


@torch.no_grad()
def update_ema(ema: Nets, nets: Nets, beta: float) -> None:
    for name, ema_net in ema.modules().items():
        for p_ema, p in zip(ema_net.parameters(), nets.modules()[name].parameters()):
            p_ema.lerp_(p, 1.0 - beta)


def make_optimizers(nets: Nets, cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    def adam(module: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        # The fused kernel (one pass per parameter, CPU and CUDA) does the same update as the
        # default multi-tensor one, with fewer passes over the weights.
        fused = next(module.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.Adam(module.parameters(), lr=lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=fused)
    return {"generator": adam(nets.generator, cfg.lr), "mapping": adam(nets.mapping, cfg.mapping_lr),
            "style_encoder": adam(nets.style_encoder, cfg.lr),
            "discriminator": adam(nets.discriminator, cfg.lr)}


@contextlib.contextmanager
def grads_only_for(nets: Nets, names: tuple[str, ...]) -> Iterator[None]:
    """Within: only the nets in `names` (those the step updates) build weight gradients. The others
    still pass gradients through to their inputs, but autograd skips their weight gradients, which
    no optimiser step would read (each D step clears them first): the same update, less work."""
    frozen = [net for name, net in nets.modules().items() if name not in names]
    for net in frozen:
        net.requires_grad_(False)
    try:
        yield
    finally:
        for net in frozen:
            net.requires_grad_(True)


def step_optimizers(optims: dict[str, torch.optim.Optimizer], names: tuple[str, ...], world: int):
    for name in names:
        params = [p for group in optims[name].param_groups for p in group["params"]]
        average_gradients(params, world)
        optims[name].step()


# ----------------------------------------------------------------------------- labels

class Labeler:
    """Pseudo-labels of the training set: cached image features x (learnable) prompt features."""

    def __init__(self, vl, prompt_bank, image_feats: torch.Tensor, cfg: TrainConfig):
        self.vl = vl
        self.prompt_bank = prompt_bank
        self.image_feats = image_feats  # [N, E] on the training device
        self.cfg = cfg

    def label(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels [N, D] float 0/1, scores [N, D]) with the current prompts."""
        from training.labeling.pseudo_labels import pseudo_labels

        with torch.no_grad():
            domain_feats, base_feat = self.prompt_bank()
            return pseudo_labels(self.image_feats, domain_feats, base_feat, mode=self.cfg.label_rule,
                                 topk=self.cfg.topk, threshold=self.cfg.threshold)

    def scores(self, images: torch.Tensor, learn_prompts: bool = False,
               relative: bool = True) -> torch.Tensor:
        """Differentiable scores [N, D] = cos(f(x), t_k) - cos(f(x), t_base) of generated images
        (`relative=False`: cos(f(x), t_k) alone); with gradients into the prompts only when
        `learn_prompts` (else the bank's cached features)."""
        with torch.set_grad_enabled(learn_prompts and torch.is_grad_enabled()):
            domain_feats, base_feat = self.prompt_bank()
        feats = self.vl.encode_images(images, size=self.cfg.dl_size(self.vl.image_size))
        cosines = feats @ domain_feats.t()
        return cosines - (feats @ base_feat)[:, None] if relative else cosines


# ----------------------------------------------------------------------------- the step

def official(cfg: TrainConfig) -> bool:
    return cfg.recipe == "lanit-official"


def discriminator_step(nets: Nets, x_real, y_org, y_trg, x_fake, cfg: TrainConfig,
                       r1_weight: float | None = None):
    """One D objective on real images and a given (detached) fake. `r1_weight`: the R1 term's weight
    this step (None: `cfg.lambda_r1`; 0: R1 skipped, as lazy R1 does between its steps)."""
    average = "pairs" if official(cfg) else "samples"
    r1_weight = cfg.lambda_r1 if r1_weight is None else r1_weight
    x_real = x_real.detach().requires_grad_(r1_weight > 0)
    # One pass over reals and fakes together (D has no batch statistics): the same logits, half
    # the calls. R1's gradient reaches x_real through the concatenation.
    out_real, out_fake = nets.discriminator(torch.cat([x_real, x_fake])).split(
        [len(x_real), len(x_fake)])
    loss_real = losses.adversarial_loss(out_real, y_org, real=True, average=average)
    loss_fake = losses.adversarial_loss(out_fake, y_trg, real=False, average=average)
    loss = loss_real + loss_fake
    logs = {"d_real": loss_real.item(), "d_fake": loss_fake.item()}
    if r1_weight > 0:
        loss_r1 = losses.r1_penalty(out_real, y_org, x_real, score="sum" if official(cfg) else "mean")
        loss = loss + r1_weight * loss_r1
        logs["d_r1"] = loss_r1.item()
    return loss, logs


def generator_step(nets: Nets, labeler: Labeler | None, x_real, y_org, y_trg, y_abl, removed,
                   style_of, cfg: TrainConfig, lambda_ds: float, learn_prompts: bool = False,
                   latent: bool = True, clock: PhaseClock | None = None, x_fake2=None, s_org=None):
    """One G objective. `style_of(targets, which)` gives the style for `which` in (1, 2) (two
    latents or two references) mixed over the `targets` rows, with gradients; `latent` says which.
    `x_fake2`: the diversity term's second translation, when already made (without gradients);
    `s_org`: the sources' own style for the cycle term, when already made (E not trained here).

    lanit-official: diversity and the domain-regularisation loss in the latent step only, the
    latter only while prompts are learned; lanit-rt: diversity in both steps, the domain loss
    whenever a labeler is given."""
    s_trg = style_of(y_trg, 1)
    if latent and cfg.lambda_id > 0:
        # The identity term's render in a latent style of the sources' own domains shares the
        # translation's encoder pass (G has no batch statistics: the same as two G calls).
        generator = nets.generator
        params = generator.adain_params(torch.cat([s_trg, style_of(y_org, 1)]))
        x_fake, x_id = generator.render(generator.content(x_real).repeat(2, 1, 1, 1), params).chunk(2)
    else:
        x_fake, x_id = nets.generator(x_real, s_trg), None
    loss_adv = losses.adversarial_loss(nets.discriminator(x_fake), y_trg, real=True,
                                       average="pairs" if official(cfg) else "samples")
    loss_sty = losses.style_reconstruction_loss(nets.style_encoder(x_fake, y_trg), s_trg)
    loss = loss_adv + cfg.lambda_sty * loss_sty
    logs = {"g_adv": loss_adv.item(), "g_sty": loss_sty.item()}
    if latent or not official(cfg):
        if x_fake2 is None:
            with torch.no_grad():  # the diversity term pushes only x_fake away from x_fake2
                x_fake2 = nets.generator(x_real, style_of(y_trg, 2))
        loss_ds = losses.diversity_loss(x_fake, x_fake2)
        loss = loss - lambda_ds * loss_ds
        logs["g_ds"] = loss_ds.item()
    x_rec = nets.generator(x_fake, nets.style_encoder(x_real, y_org) if s_org is None else s_org)
    loss_cyc = losses.cycle_loss(x_rec, x_real)
    loss = loss + cfg.lambda_cyc * loss_cyc
    logs["g_cyc"] = loss_cyc.item()
    if x_id is not None:
        loss_id = losses.identity_loss(x_id, x_real)
        loss = loss + cfg.lambda_id * loss_id
        logs["g_id"] = loss_id.item()
    if labeler is None or not cfg.lambda_dl > 0:
        return loss, logs
    with clock("dl") if clock is not None else contextlib.nullcontext():
        return _add_domain_loss(nets, labeler, x_real, x_fake, y_trg, y_abl, removed, style_of, cfg,
                                learn_prompts, latent, loss, logs)


def _add_domain_loss(nets: Nets, labeler: Labeler, x_real, x_fake, y_trg, y_abl, removed, style_of,
                     cfg: TrainConfig, learn_prompts: bool, latent: bool, loss, logs):
    """`loss` plus the recipe's domain-regularisation loss (see generator_step)."""
    if official(cfg):
        if latent and learn_prompts:
            cosines = labeler.scores(x_fake, learn_prompts, relative=False)
            loss_dl = losses.removed_domain_loss(cosines, removed)
            loss = loss + cfg.lambda_dl * loss_dl
            logs["g_dl"] = loss_dl.item()
        return loss, logs
    x_abl = nets.generator(x_real, style_of(y_abl, 1))
    scores = labeler.scores(torch.cat([x_fake, x_abl]), learn_prompts)
    n = x_real.shape[0]
    loss_dl = losses.domain_regularization_loss(scores[:n], y_trg, scores[n:], removed,
                                                scale=float(labeler.vl.logit_scale))
    loss = loss + cfg.lambda_dl * loss_dl
    logs["g_dl"] = loss_dl.item()
    return loss, logs


# ----------------------------------------------------------------------------- setup helpers

def resolve_data(cfg: TrainConfig) -> tuple[list[Path], tuple[str, ...], str]:
    """(image paths, domain texts, template set) for the config, before any heavy work."""
    if cfg.data is None:
        from training.labeling.emoji import default_dataset

        paths, default_domains = default_dataset()
        domains = cfg.domains or tuple(default_domains)
    else:  # TrainConfig requires domains with data
        paths = find_images(cfg.data, leave_out=[cfg.out])  # the run's own folder may sit inside
        domains = cfg.domains
    if len(domains) < 2:
        raise ValueError(f"LANIT needs at least 2 domain texts, got {list(domains)}")
    return list(paths), tuple(domains), cfg.template_rule


def read_templates(cfg: TrainConfig, template_set: str) -> list[str]:
    from training.labeling.prompts import TEMPLATE_SETS

    if cfg.templates_file:
        try:
            lines = Path(cfg.templates_file).read_text(encoding="utf-8").splitlines()
        except OSError as err:
            hint = (f"; for the built-in set use --set template_set={cfg.templates_file}"
                    if cfg.templates_file in TEMPLATE_SETS else "")
            raise ValueError(f"cannot read templates_file {cfg.templates_file}: "
                             f"{err.strerror or err}{hint}") from None
        templates = [t.strip() for t in lines if t.strip() and not t.startswith("#")]
        bad = [t for t in templates if t.count("{}") != 1]
        if bad or not templates:
            raise ValueError(f"{cfg.templates_file}: every template needs exactly one '{{}}' ({bad[:3]})")
        return templates
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {template_set!r}; known: {sorted(TEMPLATE_SETS)}")
    return list(TEMPLATE_SETS[template_set])


def cache_root(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LANIT_CACHE", Path.home() / ".cache" / "lanit-rt"))


# ----------------------------------------------------------------------------- the run

class Trainer:
    """Owns one run's state; `run()` trains to `cfg.steps`, saving on the way and on interruption."""

    def __init__(self, cfg: TrainConfig, vl=None, progress: bool = True,
                 resume_state: dict[str, Any] | None = None):
        """`resume_state` (from `load_train_state`) is checked against the model, domains and images
        as soon as each is known, before the expensive steps; `resume()` then loads it."""
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.progress = progress
        self.dist, self.device = init_distributed(cfg.device)
        paths, domains, template_set = resolve_data(cfg)
        self.domains = domains
        self.model_config = cfg.model_config(domains)
        if resume_state is not None:
            self.check_resume_state(resume_state)
        self.templates = read_templates(cfg, template_set)
        scan = check_images(paths, progress=progress and self.dist.main)
        if len(scan.paths) < 2:
            raise DataError(f"only {len(scan.paths)} of the {len(paths)} images could be read; LANIT "
                            "needs at least 2")
        self.images_digest = images_digest(scan.paths)  # kept in every resume state
        if resume_state is not None:
            self.check_resume_state(resume_state, len(scan.paths))
        self.skipped = scan.skipped
        self.images = ImageSet(scan.paths, cfg.img_size, progress=progress and self.dist.main)

        torch.manual_seed(cfg.seed)
        self.nets, self.ema = build_nets(self.model_config, self.device,
                                         init="he" if official(cfg) else "default")
        self.optims = make_optimizers(self.nets, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * self.dist.rank)
        self.step = 0
        self.clock = PhaseClock()  # benchmarks/train_step.py turns it on
        # torch.compile of the blocks (training.acceleration): run() compiles them, before its first
        # step or after an eager start (training.background_compile); benchmarks call compile_now().
        self.compile_wanted = should_compile(cfg.compile, self.device, cfg.steps, self.dist.world)
        self.compiled = False
        self.batched_builds = False  # inductor's kernels one library per graph (kernel_batching)

        self.labeler = self._build_labeler(vl, scan.paths)
        self.prompt_optim = None
        if cfg.stage == 2:
            self.prompt_optim = torch.optim.Adam(
                [p for p in self.labeler.prompt_bank.parameters() if p.requires_grad],
                lr=cfg.prompt_lr, betas=(cfg.beta1, cfg.beta2))
        self.labels, self.scores = self.labeler.label()
        self.pool = self._active_pool()

    def compile_now(self) -> bool:
        """Compile the nets' blocks where the config says (see training.acceleration), after
        checking that compiling works here; True when they are compiled."""
        if self.compile_wanted and not self.compiled:
            batched, reason = probe_compile(self.device)
            self._compile(batched, reason)
        return self.compiled

    def _compile(self, batched: bool, reason: str | None) -> None:
        """Compile the blocks, given what the compile probe found: why compiling does not work
        here (then warn, or fail where compile=true), or whether kernels build one library per graph."""
        if reason is not None:
            if self.cfg.compile:
                raise RunError(f"compile=true, but torch.compile does not work here ({reason}); "
                               "pass --set compile=false")
            warnings.warn(f"training without torch.compile, which does not work here ({reason}); "
                          "each step takes 1.3-1.5x longer", stacklevel=3)
            return
        import_cpp_extension_quietly()
        self.batched_builds = batched
        compile_blocks(compiled_blocks(self.nets.generator, self.nets.style_encoder))
        self.compiled = True

    def _compiles_in_background(self) -> bool:
        """Whether run() starts eagerly while a child process compiles (training.background_compile):
        single-process CPU runs that start before step `compile_after` and go on past it."""
        after = COMPILE_AFTER if self.cfg.compile_after is None else self.cfg.compile_after
        return (self.compile_wanted and not self.compiled and self.device.type == "cpu"
                and self.dist.world == 1 and self.step < after < self.cfg.steps)

    def _build_labeler(self, vl, paths: list[Path]) -> Labeler:
        from training.labeling.prompts import PromptBank, check_distinct_domains
        from training.labeling.pseudo_labels import image_features

        loaded = vl is None
        if loaded:
            from training.labeling.vl import load_vision_language

            vl = load_vision_language(self.cfg.labeler, device=self.device)
        self._check_dl_image_size(vl)
        bank = PromptBank(vl, list(self.domains), templates=self.templates,
                          base_prompt=self.cfg.base_prompt, learnable=self.cfg.stage == 2).to(self.device)
        with torch.no_grad():  # before the images are encoded: the text features alone tell
            check_distinct_domains(bank()[0], self.domains)
        cache = cache_root(self.cfg) / "features"
        # One process fills the feature cache; the others read it.
        if self.dist.main:
            feats = image_features(vl, paths, cache, progress=self.progress)
        if self.dist.world > 1:
            dist.barrier()
        if not self.dist.main:
            feats = image_features(vl, paths, cache, progress=False)
        if loaded and not bank.learnable:
            # Stage 1 encodes its prompts once (above); from here on only the image tower runs
            # (the DL loss), so the text tower's memory goes (lanit-lite's: ~90 MB).
            vl.release_text_tower()
        return Labeler(vl, bank, feats.to(self.device), self.cfg)

    def _check_dl_image_size(self, vl) -> None:
        """A `dl_image_size` the labeler cannot encode (a ViT takes only its own input size) is a
        ConfigError now, not a crash when the domain loss first runs, halfway through the run."""
        size = self.cfg.dl_image_size
        if size is None or size == vl.image_size:
            return
        try:
            with torch.no_grad():
                vl.encode_images(torch.zeros(1, 3, size, size, device=self.device), size=size)
        except Exception as err:  # noqa: BLE001 - the tower's own error, whatever its type
            raise ConfigError(f"dl_image_size={size}: the labeler {self.cfg.labeler} cannot encode "
                              f"{size}-px images ({describe(err)[:160]}); unset it to use its own "
                              f"{vl.image_size} px") from None

    def _active_pool(self) -> torch.Tensor:
        pool = torch.nonzero(self.labels.sum(dim=1) > 0).flatten().cpu()
        if len(pool) < 2:
            raise ValueError(
                f"only {len(pool)} of {len(self.images)} images have an active domain among "
                f"{list(self.domains)}: check the domain texts, the templates or the labelling mode")
        return pool

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "nets": {k: v.state_dict() for k, v in self.nets.modules().items()},
            "ema": {k: v.state_dict() for k, v in self.ema.modules().items()},
            "optims": {k: v.state_dict() for k, v in self.optims.items()},
            "sampler_rng": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "labels": self.labels.cpu(),
            "scores": self.scores.cpu(),  # stage 2 relabels with learned prompts: both move
            "images_digest": self.images_digest,
            "prompt_bank": self.labeler.prompt_bank.state_dict(),
        }
        if self.prompt_optim is not None:
            state["prompt_optim"] = self.prompt_optim.state_dict()
        return state

    def check_resume_state(self, state: dict[str, Any], num_images: int | None = None) -> None:
        """Raise CheckpointError unless `state` was saved by a run with this model and domains and,
        when `num_images` (the readable images' count) is given, on these training images: as many,
        then the same names and sizes in order (`images_digest`), as the saved labels have one row
        per image."""
        if state.get("format", OLDER_FORMATS[-1]) != CHECKPOINT_FORMAT:  # format 1 states carry none
            raise CheckpointError(older_format_message(self.out / TRAIN_STATE_FILE,
                                                       state.get("format", OLDER_FORMATS[-1])))
        saved = LanitConfig.from_dict(state["model_config"])
        if saved.domains != self.model_config.domains:
            raise CheckpointError(
                f"resume state in {self.out} was trained on the domains {list(saved.domains)}, not "
                f"{list(self.model_config.domains)}; resume with the same domains or choose another --out")
        if saved != self.model_config:
            before, now = saved.to_dict(), self.model_config.to_dict()
            changed = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in now if before.get(k) != now[k])
            raise CheckpointError(f"resume state in {self.out} was trained with a different model "
                                  f"({changed}); resume with the same settings or choose another --out")
        saved_cfg = json.loads(json.dumps(state.get("train_config", {})))  # tuples as lists, like now
        if saved_cfg:
            saved_cfg.setdefault("lambda_id", 0.0)  # states saved before the identity term had none
            saved_cfg.setdefault("augment", "resized-crop")  # and before the choice of augmentation
        now_cfg = json.loads(json.dumps(self.cfg.to_dict()))
        # domains: compared above as the model's (the embedded data's default domains are None in
        # the config the state keeps, and spelled out in the train_config.json a resume starts from)
        changed = [f"{key} {saved_cfg[key]!r} -> {now_cfg[key]!r}" for key in now_cfg
                   if key in saved_cfg and key not in (*RESUMABLE_CHANGES, "domains")
                   and saved_cfg[key] != now_cfg[key]]
        if changed:
            raise CheckpointError(
                f"resume state in {self.out} was trained with other settings ({'; '.join(changed)}); "
                f"a resumed run keeps its settings except {', '.join(RESUMABLE_CHANGES)}: resume "
                "with the same ones or choose another --out")
        if num_images is None:
            return
        saved_images = int(state["labels"].shape[0])
        data = self.cfg.data or "the embedded data"
        if saved_images != num_images:
            raise CheckpointError(
                f"resume state in {self.out} was trained on {saved_images} images, but {data} has "
                f"{num_images} readable images; resume with the same --data or choose another --out")
        if "images_digest" in state and state["images_digest"] != self.images_digest:  # older states lack it
            raise CheckpointError(
                f"resume state in {self.out} was trained on other images than those in {data} (same "
                f"count, other names or sizes); resume with the same --data or choose another --out")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_resume_state(state, len(self.images))
        for name, net in self.nets.modules().items():
            net.load_state_dict(state["nets"][name])
        for name, net in self.ema.modules().items():
            net.load_state_dict(state["ema"][name])
        for name, opt in self.optims.items():
            opt.load_state_dict(state["optims"][name])
        self.labeler.prompt_bank.load_state_dict(state["prompt_bank"])
        if self.prompt_optim is not None and "prompt_optim" in state:
            self.prompt_optim.load_state_dict(state["prompt_optim"])
        self.gen.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.labels = state["labels"].to(self.device)
        if "scores" in state:  # states saved before 2026-12-07 lack them: the first labelling's
            self.scores = state["scores"].to(self.device)
        self.pool = self._active_pool()
        self.step = int(state["step"])

    def resume(self, state: dict[str, Any] | None = None) -> None:
        """Load `state` (default: the resume state in the run folder) and drop later metrics."""
        self.load_state_dict(load_train_state(self.out) if state is None else state)
        metrics = self.out / METRICS_FILE
        if metrics.exists():  # drop lines logged after the saved step
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and logged_step(line) <= self.step]
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))

    def check_replicas(self) -> None:
        """Raise if the processes' weights have drifted apart (they must stay bit-identical)."""
        if self.dist.world == 1:
            return
        sums = torch.stack([torch.cat([p.detach().double().flatten() for p in net.parameters()]).sum()
                            for net in self.nets.modules().values()]).to(self.device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"process weights diverged at step {self.step}: {low} vs {high}")

    def save(self, final: bool = False) -> None:
        self.check_replicas()
        if not self.dist.main:
            return
        with saving(self.out / TRAIN_STATE_FILE):
            save_train_state(self.out, self.state_dict())
        latent = latent_style_table(self.ema.mapping, num_z=self.cfg.num_style_z, seed=self.cfg.seed)
        reference = self._reference_table()
        meta = {"step": self.step, "labeler": self.cfg.labeler, "stage": self.cfg.stage,
                "final": final, "num_images": len(self.images)}
        with saving(self.out / MODEL_FILE):
            save_checkpoint(self.out, self.model_config, self.ema.generator, self.ema.mapping,
                            self.ema.style_encoder, latent_table=latent, reference_table=reference,
                            metadata=meta)
        if self.cfg.stage == 2:
            from safetensors.torch import save_file

            from lanit_rt.checkpoint import atomic_write

            tensors = {k: v.detach().cpu().contiguous()
                       for k, v in self.labeler.prompt_bank.state_dict().items()}
            with saving(self.out / PROMPTS_FILE):
                atomic_write(self.out / PROMPTS_FILE, lambda tmp: save_file(tensors, tmp))

    @torch.no_grad()
    def _reference_table(self) -> torch.Tensor | None:
        """Mean EMA style-encoder style over each domain's confidently labelled images: those
        labelled on with a score at or above the domain's median positive score."""
        on = self.labels > 0
        scores = torch.where(on, self.scores, torch.full_like(self.scores, float("nan")))
        median = scores.nanmedian(dim=0).values  # [D]
        confident = on & (self.scores >= median[None, :])
        if bool((confident.sum(dim=0) == 0).any()):
            return None
        rows = torch.nonzero(confident.any(dim=1)).flatten().cpu()
        batches = ((self.images.batch(rows[i:i + 64], device=self.device), confident[rows[i:i + 64]])
                   for i in range(0, len(rows), 64))
        return reference_style_table(self.ema.style_encoder, batches, device=self.device)

    def write_run_files(self) -> None:
        if not self.dist.main:
            return
        from training.labeling.pseudo_labels import write_labels_csv

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / TRAIN_CONFIG_FILE, json.dumps(
            {**self.cfg.to_dict(), "domains": list(self.domains), "templates": self.templates,
             "num_images": len(self.images), "skipped_images": [str(p) for p, _ in self.skipped]},
            indent=2) + "\n")
        atomic_write_text(self.out / "config.json", self.model_config.to_json() + "\n")
        write_labels_csv(self.out / LABELS_FILE, [str(p) for p in self.images.paths],
                         list(self.domains), self.labels.cpu(), self.scores.cpu())

    # -- sampling ------------------------------------------------------------------------

    def _draw(self, n: int) -> torch.Tensor:
        return self.pool[torch.randint(len(self.pool), (n,), generator=self.gen)]

    def _batch(self):
        b = self.cfg.batch_size
        src, ref, ref2 = self._draw(b), self._draw(b), self._draw(b)
        augment = self.cfg.augment
        x_real, x_ref, x_ref2 = (self.images.batch(rows, self.gen, self.device, augment)
                                 for rows in (src, ref, ref2))
        y_org, y_trg = self.labels[src.to(self.labels.device)], self.labels[ref.to(self.labels.device)]
        z1 = torch.randn(b, self.model_config.latent_dim, generator=self.gen).to(self.device)
        z2 = torch.randn(b, self.model_config.latent_dim, generator=self.gen).to(self.device)
        y_abl, removed = losses.ablate_targets(y_trg, self.gen)
        return x_real, x_ref, x_ref2, y_org.to(self.device), y_trg.to(self.device), y_abl, removed, z1, z2

    # -- the loop ------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, nets, optims, clock = self.cfg, self.nets, self.optims, self.clock
        with clock("data"):
            x_real, x_ref, x_ref2, y_org, y_trg, y_abl, removed, z1, z2 = self._batch()
        world = self.dist.world
        learn_prompts = self.prompt_optim is not None and self.step >= cfg.prompt_start_step
        logs: dict[str, float] = {}

        # One generator pass, without gradients, makes both D steps' fakes and the latent step's
        # second translation for the diversity term: G, F and E do not change until the first G
        # update. (lanit-rt's reference step makes its own, after the latent step has moved G.)
        # The sources' content features are computed once and rendered in every style.
        with clock("d_fakes"), torch.no_grad():
            latent1, latent2 = nets.mapping(torch.cat([z1, z2]), y_trg.repeat(2, 1)).chunk(2)
            styles = [latent1, nets.style_encoder(x_ref, y_trg), latent2]
            generator = nets.generator
            content = generator.content(x_real).repeat(len(styles), 1, 1, 1)
            made = generator.render(content, generator.adain_params(torch.cat(styles))).chunk(len(styles))
            fakes, latent_second = made[:2], made[2]
        r1_weight = losses.lazy_r1_weight(self.step, cfg.lambda_r1, cfg.r1_every)
        for kind, x_fake in zip(("latent", "ref"), fakes):
            with clock(f"d_{kind}"):
                d_loss, d_logs = discriminator_step(nets, x_real, y_org, y_trg, x_fake, cfg, r1_weight)
                optims["discriminator"].zero_grad(set_to_none=True)
                d_loss.backward()
                with clock("optimizer"):
                    step_optimizers(optims, ("discriminator",), world)
            logs.update({f"{k}_{kind}": v for k, v in d_logs.items()})

        lambda_ds = losses.diversity_weight(self.step, cfg.lambda_ds, cfg.ds_decay_span)
        latents = {1: z1, 2: z2}
        refs = {1: x_ref, 2: x_ref2}
        for kind in ("latent", "ref"):
            s_org = None
            if kind == "latent":
                def style_of(targets, which):
                    return nets.mapping(latents[which], targets)
                names = ("generator", "mapping", "style_encoder")
            else:
                # E is not trained in this step: the references' and the sources' per-domain
                # styles in one pass, without gradients.
                with torch.no_grad():
                    ref_styles, own_styles = nets.style_encoder.all_styles(torch.cat([x_ref, x_real])).chunk(2)
                s_org = mix_styles(own_styles, y_org)

                def style_of(targets, which):
                    if which == 1:
                        return mix_styles(ref_styles, targets)
                    return nets.style_encoder(refs[which], targets)
                names = ("generator",)
            with clock(f"g_{kind}"), grads_only_for(nets, names):
                g_loss, g_logs = generator_step(nets, self.labeler, x_real, y_org, y_trg, y_abl, removed,
                                                style_of, cfg, lambda_ds, learn_prompts,
                                                latent=kind == "latent", clock=clock,
                                                x_fake2=latent_second if kind == "latent" else None,
                                                s_org=s_org)
                for name in optims:
                    optims[name].zero_grad(set_to_none=True)
                if learn_prompts:
                    self.prompt_optim.zero_grad(set_to_none=True)
                g_loss.backward()
                with clock("optimizer"):
                    step_optimizers(optims, names, world)
                    if learn_prompts:
                        prompt_params = [p for g in self.prompt_optim.param_groups for p in g["params"]]
                        average_gradients(prompt_params, world)
                        self.prompt_optim.step()
            logs.update({f"{k}_{kind}": v for k, v in g_logs.items()})

        with clock("ema"):
            update_ema(self.ema, nets, losses.ema_beta(self.step, cfg.ema_beta))
        self.step += 1
        if learn_prompts and every(self.step, cfg.relabel_every):
            with clock("relabel"):
                self.labels, self.scores = self.labeler.label()
                self.pool = self._active_pool()
        logs["lambda_ds"] = lambda_ds
        return logs

    def _stop_reason(self, stop_at: float | None, stop: threading.Event) -> str | None:
        """"interrupt" (Ctrl-C), "time" (`time.monotonic()` has reached `stop_at`) or None; all
        processes agree (rank 0 decides), without a device sync when there is only one."""
        flags = [stop.is_set(), stop_at is not None and time.monotonic() >= stop_at]
        if self.dist.world > 1:
            shared = torch.tensor([float(f) for f in flags], device=self.device)
            dist.broadcast(shared, src=0)
            flags = [bool(f) for f in shared.tolist()]
        return "interrupt" if flags[0] else "time" if flags[1] else None

    def _log_due(self, step: int) -> bool:
        """Whether `step` is logged in the loop: every `log_every` steps, and the last of `steps`."""
        return every(step, self.cfg.log_every) or step == self.cfg.steps

    def _log(self, logs: dict[str, float], started: float, start_step: int) -> None:
        """Append the step's losses to metrics.jsonl (main process)."""
        if self.dist.main:
            elapsed = time.perf_counter() - started
            record = {"step": self.step, "time": round(elapsed, 3),
                      "steps_per_s": round((self.step - start_step) / max(elapsed, 1e-9), 4),
                      **{k: round(v, 6) for k, v in logs.items()}}
            with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _status_line(self, logs: dict[str, float], started: float, start_step: int) -> str:
        """What the progress bar shows, as one line (--no-progress prints it at each sample or save)."""
        rate = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
        losses = ", ".join(f"{name} {value}" for name, value in loss_summary(logs).items())
        return f"step {self.step}/{self.cfg.steps} ({rate:.2f} steps/s): {losses}"

    def sample(self) -> Path | None:
        if not self.dist.main:
            return None
        path = self.out / "samples" / f"step_{self.step:06d}.png"
        save_sample_grid(path, self.ema, self.images, self.pool, self.labels, self.domains,
                         seed=self.cfg.seed, device=self.device, step=self.step)
        return path

    def run(self, stop_at: float | None = None) -> Path:
        """Train to `cfg.steps`, or until `time.monotonic()` reaches `stop_at` (train() sets it from
        the config's time budget), then save as finished."""
        cfg = self.cfg
        self.write_run_files()
        metrics_path = self.out / METRICS_FILE
        if self.dist.main and self.step == 0 and metrics_path.exists():
            metrics_path.unlink()  # left by an earlier attempt that never saved; this one starts over
        background = self._compiles_in_background()
        if not background:
            self.compile_now()
        # With a time budget the bar's total (the step count) is an upper bound, not the end.
        desc = "training"
        if stop_at is not None:
            desc += f" (stops within {max(stop_at - time.monotonic(), 0.0) / 60:.1f} min)"
        bar = tqdm(total=cfg.steps, initial=self.step, desc=desc, unit="step",
                   disable=not (self.progress and self.dist.main), dynamic_ncols=True)
        started, start_step = time.perf_counter(), self.step
        logs = None
        if self.dist.main and self.progress and self.step < cfg.steps:
            if self.compiled:
                tqdm.write("the first steps compile the generator and style encoder (torch.compile: "
                           "30-80 s on 2 CPU cores the first time, seconds once cached)")
            elif background and cfg.compile_after is None:
                tqdm.write(f"step {self.step + 1} trains eagerly; then the generator and style "
                           "encoder compile (torch.compile) from the caches of an earlier run, or, "
                           f"where there are none, steps {self.step + 2}-{COMPILE_AFTER} train "
                           "eagerly on one thread fewer while a child process compiles them")
            elif background:
                tqdm.write(f"steps {self.step + 1}-{cfg.compile_after} train eagerly on one thread "
                           "fewer while a child process compiles the generator and style encoder "
                           "(torch.compile); the compiled blocks take over from there")
        mid_step = False
        if self.device.type == "cpu":
            # From here on, not while labelling: what that frees would stay resident (train()
            # restores glibc's defaults when the run ends).
            keep_freed_memory()
        try:
            with stop_requests() as stop, contextlib.ExitStack() as scope:
                if self.batched_builds:
                    scope.enter_context(batched_kernel_builds())
                eager_start = EagerStart(self, scope) if background else None
                while self.step < cfg.steps:
                    reason = self._stop_reason(stop_at, stop)
                    if reason == "interrupt":
                        raise KeyboardInterrupt
                    if reason == "time":
                        if self.dist.main:
                            tqdm.write(f"time budget of {cfg.time_budget_s / 60:.1f} min reached at "
                                       f"step {self.step} of {cfg.steps}; the rest: "
                                       f"{resume_command(self.out)}")
                        break
                    if eager_start is not None and not eager_start.compile_if_due(stop, stop_at):
                        continue  # a stop or the time budget came while the child compiled
                    mid_step = True
                    try:
                        logs = self.train_step() if eager_start is None else eager_start.train_step()
                    except Exception:
                        # Ctrl-C reaches the whole process group, so the C++ compilers that
                        # torch.compile runs in a run's first step die of it: a stop, not a bug.
                        # The step is half done, so nothing of it is saved.
                        if self.compiled and stop.is_set():
                            tqdm.write(f"Ctrl-C stopped torch.compile's C++ compiler in step "
                                       f"{self.step + 1}, so that step is not saved")
                            raise KeyboardInterrupt from None
                        raise
                    mid_step = False
                    bar.update(1)
                    if self._log_due(self.step):
                        self._log(logs, started, start_step)
                        bar.set_postfix(loss_summary(logs))
                    if every(self.step, cfg.sample_every):
                        self.sample()
                    if not self.progress and self.dist.main and \
                            (every(self.step, cfg.sample_every) or every(self.step, cfg.save_every)):
                        print(self._status_line(logs, started, start_step), flush=True)
                    if every(self.step, cfg.save_every) and self.step < cfg.steps:
                        self.save()
        except KeyboardInterrupt:
            bar.close()
            if mid_step:  # a second Ctrl-C inside a step: its half-done update must not be saved
                raise
            self.save()
            raise TrainingInterrupted(self.step) from None
        bar.close()
        if logs is not None and not self._log_due(self.step):  # the time budget ended it between logs
            self._log(logs, started, start_step)
        self.save(final=True)
        self.write_run_files()
        if not every(self.step, cfg.sample_every):
            self.sample()
        return self.out


class EagerStart:
    """A run whose blocks compile after an eager start (training.background_compile), within
    `Trainer.run`'s `scope`: the first step records how it calls the blocks and starts the child
    process that compiles them; until step `compile_after` the steps train eagerly on one thread
    fewer; then the trainer compiles its blocks from the caches the child filled. An auto
    `compile_after` comes to COMPILE_AFTER there, or to the first step where a child compiled the
    same calls before (its marker is in the caches): then no child runs."""

    def __init__(self, trainer: Trainer, scope: contextlib.ExitStack):
        self.trainer, self.scope = trainer, scope
        self.threads = torch.get_num_threads()
        self.child: BackgroundCompile | None = None
        self.eager = True  # until the switch
        torch.set_num_threads(max(self.threads - 1, 1))
        scope.callback(torch.set_num_threads, self.threads)

    def train_step(self) -> dict[str, float]:
        trainer = self.trainer
        if not self.eager or self.child is not None:
            return trainer.train_step()
        blocks = compiled_blocks(trainer.nets.generator, trainer.nets.style_encoder)
        with record_block_calls(blocks) as recording:
            logs = trainer.train_step()
        if recording.unsupported is None:
            request = (trainer.model_config.to_dict(), recording.calls, trainer.device, self.threads)
            cached = compiled_before(*request) if trainer.cfg.compile_after is None else None
            if cached is not None:  # the caches hold it all: compile from them here and now
                self._resolve(trainer.step)
                self._switch(cached.batched, None)
                if trainer.progress and trainer.dist.main:
                    tqdm.write(f"step {trainer.step}: the compiled blocks take over (their compile "
                               "is in inductor's caches from an earlier run)")
                return logs
            try:
                self.child = BackgroundCompile(*request)
            except OSError:  # no process to be had: compile here and now, as below
                pass
            else:
                self.scope.callback(self.child.close)
                self._resolve(COMPILE_AFTER)
                return logs
        # calls the child cannot replay, or no child: compile here and now
        self._resolve(trainer.step)
        self._switch(*probe_compile(trainer.device))
        return logs

    def _resolve(self, step: int) -> None:
        """Record the step an auto `compile_after` came to (in the config, train_config.json and
        later saves), so that the run can be repeated with it."""
        trainer = self.trainer
        if trainer.cfg.compile_after is None:
            trainer.cfg = trainer.cfg.replace(compile_after=step)
            trainer.write_run_files()

    def compile_if_due(self, stop: threading.Event, stop_at: float | None) -> bool:
        """At step `compile_after`: wait for the child, then compile from its caches. False where a
        stop or the time budget came first."""
        trainer = self.trainer
        if not self.eager or self.child is None or trainer.step < trainer.cfg.compile_after:
            return True  # (a child is started only once compile_after is resolved)
        if not self.child.done() and trainer.progress and trainer.dist.main:
            tqdm.write(f"step {trainer.step}: waiting for the compile in the background to finish")
        while not self.child.done():
            if stop.is_set() or (stop_at is not None and time.monotonic() >= stop_at):
                return False
            time.sleep(0.05)
        result = self.child.result()
        self.child.close()
        self._switch(result.batched, result.reason)
        if trainer.compiled and result.seconds is not None and trainer.progress and trainer.dist.main:
            tqdm.write(f"step {trainer.step}: the compiled blocks take over (compiled in a child "
                       f"process in {result.seconds:.0f} s)")
        return True

    def _switch(self, batched: bool, reason: str | None) -> None:
        self.eager = False
        torch.set_num_threads(self.threads)
        self.trainer._compile(batched, reason)
        if self.trainer.batched_builds:
            self.scope.enter_context(batched_kernel_builds())


def loss_summary(logs: dict[str, float]) -> dict[str, str]:
    """The losses a person watches, formatted: D's latent-step total, G's adversarial and cycle terms."""
    return {"d": f"{logs['d_real_latent'] + logs['d_fake_latent']:.2f}", "g": f"{logs['g_adv_latent']:.2f}",
            "cyc": f"{logs['g_cyc_latent']:.3f}"}


def every(step: int, period: int) -> bool:
    """Whether a periodic action (log, sample, save, relabel) is due at `step`; period 0: never."""
    return period > 0 and step % period == 0


def train(cfg: TrainConfig, vl=None, resume: bool = False, progress: bool = True, *,
          started: float | None = None, reserve_s: float = 0.0) -> Path:
    """Train a LANIT model per `cfg`; returns the output folder (see the module docstring).

    The output folder and any resume state are checked before images are loaded or labelled, and
    nothing is written there until both the data and the resume state are known to fit.

    The config's time budget counts from `started` (a `time.monotonic()` reading; default: now),
    and training stops `reserve_s` seconds before it runs out, for what the caller does after
    (training.run's closing evaluation)."""
    started = time.monotonic() if started is None else started
    out = Path(cfg.out)
    made = outermost_missing(out)
    prepare_out_folder(out, resume)
    state = load_train_state(cfg.out) if resume else None
    # Before the run's files are rewritten: a finished run resumed again (a resubmitted job) stays
    # as it is, and a smaller --steps must not become its recorded setting.
    if state is not None and isinstance(state.get("step"), int) and state["step"] >= cfg.steps:
        raise NothingToTrain(out, state["step"], cfg.steps)
    try:
        trainer = Trainer(cfg, vl=vl, progress=progress, resume_state=state)
    except BaseException:  # a bad labeler, data that labels badly, Ctrl-C: no empty run folder left
        remove_unused_folders(out, made)
        raise
    if state is not None:
        trainer.resume(state)
    budget = cfg.time_budget_s
    try:
        return trainer.run(stop_at=None if budget is None else started + budget - reserve_s)
    finally:
        if trainer.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if trainer.device.type == "cpu":
            del trainer  # its nets and optimiser state go before the heap is trimmed
            release_freed_memory()
