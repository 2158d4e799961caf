"""`Translator`: the application-facing API for LANIT image-to-image translation on every backend.

    translator = Translator.from_checkpoint("runs/emoji", device="cuda")
    out = translator.translate(image, "blond hair")                 # one text target
    out = translator.translate(images, ["blond hair", "beard"])     # multi-hot target
    out = translator.translate(images, {"blond hair": 2, "beard": 1})
    out = translator.translate(images, "beard", seed=3)             # latent-guided (mapping network)
    out = translator.translate(images, "beard", reference=ref)      # reference-guided (style encoder)

Targets. A domain target becomes normalised weights w [N, D] (rows sum to 1). With domains only,
the style is the exact multi-hot mix of the checkpoint's style table, s = w @ style_table; the torch
backend mixes a precomputed AdaIN table instead (identical, the map is affine). With `seed=` / `z=`
the style is F(z, w) (mapping network), with `reference=` it is E(reference, w) (style encoder), with
`style=` it is given directly. Those three need a style input in the backend (torch, or the
exported '.style.onnx' graph) and, for seed/reference, the checkpoint's networks (from_checkpoint).

Images. See lanit_rt.images: PIL / image file paths / uint8 numpy / float tensors in [-1, 1],
single or batched, any size; results come back in the same kind (PIL for paths), at model size or
(resize_back=True) the input size.

Host fast path. With a host backend (onnxruntime, openvino), a call whose images are uint8 at the
model size (one RGB PIL image, a uint8 [S, S, 3] array or a [N, S, S, 3] stack) and whose target is a
domain spec (no seed / reference / style) skips the general conversion: it fills preallocated numpy
buffers bound once to the engine (`Backend.host_slot`), reuses the normalised weights of a spec it
has seen before, and turns the output into uint8 with in-place numpy ufuncs. The result is the one
the general path gives (same formulas; `benchmarks/edge_cpu.py` measures the time outside the graph).

Threads. A Translator may be called from several threads at once. Host-side conversion runs in the
calling thread with per-thread pinned staging buffers; each backend serialises its device stage with
one lock around its shared buffers (and CUDA-graph replay); the mapping network and style encoder
hold no mutable state.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lanit_rt.backends.base import (ArtifactError, Backend, check_expected_domains, check_same_config,
                                    check_same_weights)
from lanit_rt.backends.torch import TorchBackend
from lanit_rt.checkpoint import CheckpointError, load_checkpoint
from lanit_rt.config import LanitConfig
from lanit_rt.images import closed_unread, from_model_batch, load_images, plain_rgb, to_model_batch
from lanit_rt.networks import MappingNetwork, StyleEncoder
from lanit_rt.style import mix_styles, normalize_domain_weights

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ONNX_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
IR_FILE = "model.xml"
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_MAX_CACHED_SLOTS = 8
_MAX_CACHED_TARGETS = 256


def resolve_dtype(dtype: Any, device: torch.device | str) -> torch.dtype:
    """None -> fp16 on CUDA, fp32 elsewhere; accepts torch dtypes and "fp32" / "fp16" / "bf16"."""
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    if dtype not in _PRECISION_NAMES:
        raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


def check_device(device: torch.device | str, present: bool = True) -> torch.device:
    """`device` as a torch.device the backends run on ("cpu", "cuda", "cuda:N") and, with `present`,
    that this machine has; ValueError otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} cannot run a Translator; use 'cpu', 'cuda' or 'cuda:N'")
    if present and resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{resolved}': no CUDA device is available here; use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device '{resolved}': only {torch.cuda.device_count()} CUDA device(s) here")
    return resolved


def _host_tensor(value: Any, what: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`value` (tensor, array or nested list) as a detached CPU tensor of `dtype`."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{what}: a tensor on the meta device holds no data")
    try:
        return torch.as_tensor(value).detach().to("cpu", dtype)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{what} must be numbers (a tensor or an array), got {type(value).__name__}: "
                        f"{err}") from None


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


class Translator:
    """Translate images to text-named domains with one of the backends (see module docstring)."""

    def __init__(self, backend: Backend, mapping: MappingNetwork | None = None,
                 style_encoder: StyleEncoder | None = None, style_device: torch.device | str = "cpu"):
        self.backend = backend
        self.config: LanitConfig = backend.config
        self.mapping = mapping
        self.style_encoder = style_encoder
        self.style_device = torch.device(style_device)
        self._local = threading.local()
        self._target_rows: dict[Any, np.ndarray] = {}  # hashable domain spec -> normalised [1, D]

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        backend: str = "torch", dtype: Any = None, impl: str = "auto", *,
                        artifact: str | os.PathLike | None = None, providers: Sequence[Any] | None = None,
                        channels_last: bool | None = None, cuda_graphs: bool = False,
                        export: bool = False, threads: int | None = None, optimization: str = "all",
                        spin_wait: bool | None = None, precision: str = "auto",
                        performance_hint: str = "latency") -> "Translator":
        """Load a checkpoint folder / model.safetensors.

        backend="torch" runs its generator in `dtype` (None: fp16 on CUDA, fp32 on CPU) with `impl`
        kernels. "onnxruntime" / "openvino" / "tensorrt" run the exported generator at `artifact`
        (default model.onnx / model.xml, else model.onnx / model.engine in the checkpoint folder) and
        keep the checkpoint's mapping network and style encoder (fp32, torch) for seed- and
        reference-guided targets; the artifact must have been exported from this checkpoint's
        weights. With `export=True` a missing ONNX artifact is exported (and validated) to that
        path first, instead of stopping (needs the `onnx` extra; TensorRT engines are built with
        lanit-export).

        onnxruntime: `threads` (intra-op threads), `optimization` ("all" | "extended" | "basic" |
        "disabled"), `spin_wait`, `providers`. openvino: `precision` ("auto": bf16 where the CPU
        has it, else fp32; "fp32" | "bf16" | "fp16"), `performance_hint` ("latency" | "throughput"),
        `threads`.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        device = check_device(device, present=False)  # the arguments' own errors first, then the machine
        if backend != "torch":
            torch_only = [name for name, given in (("impl", impl != "auto"), ("cuda_graphs", cuda_graphs),
                                                   ("channels_last", channels_last is not None)) if given]
            if torch_only:
                raise ValueError(f"{', '.join(torch_only)} apply to backend='torch' only, not {backend!r}")
        elif artifact is not None:
            raise ValueError("artifact= names an exported file: use it with backend='onnxruntime', "
                             "'openvino' or 'tensorrt'")
        elif export:
            raise ValueError("export=True writes an exported file: use it with backend='onnxruntime' "
                             "or 'openvino'")
        if providers is not None and backend != "onnxruntime":
            raise ValueError(f"providers= applies to backend='onnxruntime' only, not {backend!r}")
        ort_only = [name for name, given in (("optimization", optimization != "all"),
                                             ("spin_wait", spin_wait is not None)) if given]
        if ort_only and backend != "onnxruntime":
            raise ValueError(f"{', '.join(ort_only)} apply to backend='onnxruntime' only, not {backend!r}")
        ov_only = [name for name, given in (("precision", precision != "auto"),
                                            ("performance_hint", performance_hint != "latency")) if given]
        if ov_only and backend != "openvino":
            raise ValueError(f"{', '.join(ov_only)} apply to backend='openvino' only (dtype= states the "
                             f"precision elsewhere), not {backend!r}")
        if threads is not None and backend not in ("onnxruntime", "openvino"):
            raise ValueError(f"threads= applies to backend='onnxruntime' or 'openvino' only, not {backend!r}")
        if backend == "openvino" and device.type != "cpu":
            raise ValueError("the openvino backend runs on the CPU: use device='cpu'")
        if export and backend == "tensorrt":
            raise ValueError("export=True writes ONNX graphs; build TensorRT engines with "
                             "`lanit-export CHECKPOINT --trt fp16`")
        check_device(device)
        model = load_checkpoint(path, device=device)
        folder = _checkpoint_folder(path)
        if backend == "torch":
            runner: Backend = TorchBackend(model, device=device, dtype=resolve_dtype(dtype, device),
                                           impl=impl, channels_last=channels_last,
                                           cuda_graphs=cuda_graphs)
        elif backend in ("onnxruntime", "openvino"):
            default = folder / ONNX_FILE
            if backend == "openvino" and artifact is None and (folder / IR_FILE).exists():
                default = folder / IR_FILE
            artifact_path = Path(artifact) if artifact is not None else default
            if not artifact_path.exists():
                if not export:
                    raise ArtifactError(f"no ONNX artifact at {artifact_path}; export one with "
                                        f"`lanit-export {path} --onnx {artifact_path}` or pass export=True")
                _export_onnx(model, artifact_path)
            if backend == "onnxruntime":
                from lanit_rt.backends.onnxruntime import OnnxRuntimeBackend
                runner = OnnxRuntimeBackend(artifact_path, device=device, providers=providers,
                                            threads=threads, optimization=optimization, spin_wait=spin_wait)
                _check_precision(runner.precision, dtype, device, str(artifact_path),
                                 f"ONNX graphs are fp32 or fp16: `lanit-export {path} --onnx OUT.onnx "
                                 "[--fp16]` writes one, then pass artifact='OUT.onnx'")
            else:
                from lanit_rt.backends.openvino import OpenVINOBackend
                if dtype is not None:
                    raise ValueError("the openvino backend takes precision=, not dtype=")
                runner = OpenVINOBackend(artifact_path, precision=precision,
                                         performance_hint=performance_hint, threads=threads)
            check_same_config(runner.config, model.config, str(artifact_path))
            again = (f"`lanit-export {path} --onnx {artifact_path}`" if artifact_path.suffix == ".onnx"
                     else f"`lanit-export {path} --openvino {artifact_path}`")
            check_same_weights(runner.weights_digest, model.weights_digest(), str(artifact_path), str(path), again)
        else:
            from lanit_rt.backends.tensorrt import TensorRTBackend
            engine_path = Path(artifact) if artifact is not None else folder / ENGINE_FILE
            runner = TensorRTBackend(engine_path, device=device)
            check_same_config(runner.config, model.config, str(engine_path))
            check_same_weights(runner.weights_digest, model.weights_digest(), str(engine_path), str(path),
                               f"`lanit-export {path} --trt {runner.precision} --out {engine_path}`")
            wanted = _PRECISION_NAMES[resolve_dtype(dtype, device)] if dtype is not None else None
            _check_precision(runner.precision, dtype, device, str(engine_path),
                             f"`lanit-export {path} --trt {wanted} --out OUT.engine` builds one; pass "
                             "artifact='OUT.engine'")
        return cls(runner, mapping=model.mapping, style_encoder=model.style_encoder, style_device=device)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                  providers: Sequence[Any] | None = None, *, domains: Sequence[str] | None = None,
                  threads: int | None = None) -> "Translator":
        """Run an exported OUT.onnx (and OUT.style.onnx when present) with onnxruntime.

        Config and domain texts come from the graph metadata; `domains`, when given, must equal
        them (ArtifactError otherwise). Seed/reference targets need from_checkpoint.
        """
        from lanit_rt.backends.onnxruntime import OnnxRuntimeBackend
        runner = OnnxRuntimeBackend(path, device=check_device(device), providers=providers, threads=threads)
        check_expected_domains(runner.config.domains, domains, str(path))
        return cls(runner)

    @classmethod
    def from_openvino(cls, path: str | os.PathLike, *, precision: str = "auto",
                      performance_hint: str = "latency", threads: int | None = None,
                      domains: Sequence[str] | None = None) -> "Translator":
        """Run an exported OUT.onnx or OUT.xml (OpenVINO IR, with OUT.style.* when present) with
        OpenVINO on the CPU; see lanit_rt.backends.openvino for precision and hints."""
        from lanit_rt.backends.openvino import OpenVINOBackend
        runner = OpenVINOBackend(path, precision=precision, performance_hint=performance_hint,
                                 threads=threads)
        check_expected_domains(runner.config.domains, domains, str(path))
        return cls(runner)

    @classmethod
    def from_engine(cls, path: str | os.PathLike, device: torch.device | str = "cuda", *,
                    domains: Sequence[str] | None = None) -> "Translator":
        """Run a TensorRT engine OUT.engine described by OUT.engine.json."""
        from lanit_rt.backends.tensorrt import TensorRTBackend, read_sidecar
        device = check_device(device, present=False)  # the engine's own errors come first
        check_expected_domains(read_sidecar(path)["domains"], domains, str(path))
        return cls(TensorRTBackend(path, device=device))

    # ----------------------------------------------------------------------------- targets
    @property
    def domains(self) -> tuple[str, ...]:
        return self.config.domains

    def domain_weights(self, domains: Any, n: int = 1) -> torch.Tensor:
        """A domain spec -> normalised weights [n, D] float32 on the CPU.

        Specs: a name; an int index; a list/tuple of names or indices (multi-hot, equal weights); a
        dict name-or-index -> non-negative weight; a [D] or [N, D] tensor / array of weights ([D]
        and [1, D] broadcast to every image).
        """
        d = self.config.num_domains
        if isinstance(domains, np.ndarray) and domains.dtype.kind in "USO":
            if domains.dtype.kind != "O" or all(isinstance(v, str) for v in domains.flat):
                domains = domains.tolist()  # an array of names is a list of names
            else:  # numbers that pandas or a mixed list left in an object array: weights
                try:
                    domains = domains.astype(np.float64)
                except (TypeError, ValueError):
                    raise TypeError("an object array of domains must hold only names or only "
                                    f"numbers (weights), got {domains.tolist()!r}") from None
        # Weights are gathered and normalised in float64: finite Python floats may overflow float32.
        if isinstance(domains, (str, bool, int, np.integer)):
            weights = torch.zeros(1, d, dtype=torch.float64)
            weights[0, self._index(domains)] = 1.0
        elif isinstance(domains, Mapping):
            if not domains:
                raise ValueError("empty domain dict: give at least one domain weight")
            weights = torch.zeros(1, d, dtype=torch.float64)
            seen: set[int] = set()
            for key, value in domains.items():
                value = float(value)
                if not np.isfinite(value) or value < 0:
                    raise ValueError(f"domain weight for {key!r} must be finite and >= 0, got {value}")
                index = self._index(key)
                if index in seen:  # a name and its index, say
                    raise ValueError(f"domain {self.domains[index]!r} is given twice in {domains!r}")
                seen.add(index)
                weights[0, index] = value
        elif isinstance(domains, (list, tuple)):
            if not domains:
                raise ValueError("empty domain list: give at least one domain")
            weights = torch.zeros(1, d, dtype=torch.float64)
            for item in domains:
                index = self._index(item)
                if weights[0, index]:
                    hint = ("; a list holds domain names or indices: pass 0/1 weights as a numpy array "
                            "or tensor" if all(type(v) is int and v in (0, 1) for v in domains) else "")
                    raise ValueError(f"domain {self.domains[index]!r} is given twice in {list(domains)!r}{hint}")
                weights[0, index] = 1.0
        elif isinstance(domains, (torch.Tensor, np.ndarray)):
            weights = _host_tensor(domains, "domain weights", torch.float64)
            given = tuple(weights.shape)
            if weights.dim() == 1:
                weights = weights[None]
            if weights.dim() != 2 or weights.shape[1] != d:
                raise ValueError(f"domain weights must be [N, {d}] (or [{d}]) for the {d} domains "
                                 f"{list(self.domains)}, got shape {given}")
            if not bool(torch.isfinite(weights).all()):
                raise ValueError("domain weights hold NaN or infinite values")
        else:
            raise TypeError(f"unsupported domain spec {type(domains).__name__}; use a name, an index, a "
                            "list of names, a dict of weights or an [N, D] tensor")
        if weights.shape[0] == 1 and n != 1:
            weights = weights.expand(n, d)
        elif weights.shape[0] != n:
            raise ValueError(f"domain weights have {weights.shape[0]} rows for {n} images")
        # Each row scaled to a largest weight of 1 before float32 (all-zero rows stay zero, and
        # are refused by normalize_domain_weights like negative weights).
        largest = weights.abs().amax(dim=1, keepdim=True)
        weights = weights / torch.where(largest > 0, largest, torch.ones_like(largest))
        return normalize_domain_weights(weights.float()).contiguous()

    def _index(self, key: Any) -> int:
        if isinstance(key, str):
            return self.config.domain_index(key)  # KeyError listing the known domains
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"a domain is a name or an int index, got {key!r}")
        if not 0 <= int(key) < self.config.num_domains:
            raise IndexError(f"domain index {int(key)} out of range for {self.config.num_domains} "
                             f"domains {list(self.domains)}")
        return int(key)

    @torch.inference_mode()
    def latent_style(self, weights: torch.Tensor, *, seed: int | None = None,
                     z: Any = None) -> torch.Tensor:
        """Mapping-network style F(z, w) [N, S] fp32; z [N, latent] (or [latent], broadcast), or drawn
        as torch.randn(N, latent) from a CPU generator seeded with `seed`."""
        if self.mapping is None:
            raise CheckpointError("seed=/z= need the mapping network: load with "
                                  "Translator.from_checkpoint from a checkpoint that has one")
        n, latent = weights.shape[0], self.config.latent_dim
        if (seed is None) == (z is None):
            raise ValueError("pass exactly one of seed= or z=")
        if z is None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63:
                raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            z = torch.randn(n, latent, generator=generator)
        z = _host_tensor(z, "z")
        if z.dim() == 1:
            z = z[None]
        if z.dim() != 2 or z.shape[1] != latent or z.shape[0] not in (1, n):
            raise ValueError(f"z must be [{n}, {latent}] (or [{latent}]), got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("z holds NaN or infinite values")
        z = z.expand(n, latent)
        style = self.mapping(z.to(self.style_device), weights.to(self.style_device)).float()
        if not bool(torch.isfinite(style).all()):  # z of 1e30 and more overflows the mapping network
            raise ValueError("z is too large: the mapping network's styles overflow (draw z ~ N(0, 1))")
        return style

    @torch.inference_mode()
    def reference_style(self, reference: Any, weights: torch.Tensor) -> torch.Tensor:
        """Style-encoder style E(reference, w) [N, S] fp32; one reference, or one per image."""
        if self.style_encoder is None:
            raise CheckpointError("reference= needs the style encoder: load with "
                                  "Translator.from_checkpoint from a checkpoint that has one")
        raw = load_images(reference)
        n = weights.shape[0]
        if raw.spec.count not in (1, n):
            raise ValueError(f"got {raw.spec.count} reference images for {n} image{'s' * (n != 1)}; "
                             f"pass {'1' if n == 1 else f'1 or {n}'}")
        refs = to_model_batch(raw, self.config.img_size, self.style_device)
        styles = self.style_encoder.all_styles(refs).float()  # [R, D, S]
        styles = styles.expand(n, -1, -1)
        return mix_styles(styles, weights.to(self.style_device))

    # ----------------------------------------------------------------------------- translation
    def translate(self, images: Any, domains: Any = None, *, reference: Any = None,
                  seed: int | None = None, z: Any = None, style: Any = None,
                  resize_back: bool = False) -> Any:
        """Translate `images` to the target `domains` (see the module docstring for all forms).

        Returns the images in the input's kind: PIL or a file's path -> PIL, uint8 numpy -> uint8
        numpy, tensor -> tensor in [-1, 1] (input dtype and device); single in -> single out, batch
        in -> batch out.
        """
        if reference is None and seed is None and z is None and style is None and domains is not None:
            result = self._translate_host(images, domains)
            if result is not None:
                return result
        raw = load_images(images)
        n = raw.spec.count
        latent = seed if z is None else z
        guides = [name for name, value in (("reference", reference), ("seed/z", latent), ("style", style))
                  if value is not None]
        if len(guides) > 1:
            raise ValueError(f"pass at most one of reference=, seed=/z=, style=; got {guides}")
        if seed is not None and z is not None:
            raise ValueError("pass seed= or z=, not both")
        if domains is not None and style is not None:
            raise ValueError("style= fixes the target by itself; pass domains= or style=, not both")
        if domains is None and style is None:
            raise ValueError(f"pass domains= (a name, a list of names, a dict of weights, an index or "
                             f"[N, D] weights); known domains: {list(self.domains)}")
        weights = self.domain_weights(domains, n) if domains is not None else None
        if guides and not self.backend.supports_style:
            remedy = ("export the '.style' graph too" if self.backend.name == "onnxruntime" else
                      "lanit-export builds TensorRT engines for domain targets only; use the torch or "
                      "onnxruntime backend for these targets")
            raise ArtifactError(f"{guides[0]}-guided translation needs a style input, which the "
                                f"{self.backend.name} artifact lacks ({remedy})")

        if reference is not None:
            style_vectors = self.reference_style(reference, weights)
        elif seed is not None or z is not None:
            style_vectors = self.latent_style(weights, seed=seed, z=z)
        elif style is not None:
            style_vectors = self._check_style(style, n)
        else:
            style_vectors = None

        batch = to_model_batch(raw, self.config.img_size, self.backend.device,
                               staging=self._staging(raw))
        if style_vectors is None:
            output = self.backend.run_weights(batch, weights)
        else:
            output = self.backend.run_style(batch, style_vectors)
        download = (self._pinned_download if output.device.type == "cuda" and raw.spec.kind != "tensor"
                    else None)
        return from_model_batch(output, raw.spec, resize_back, host_buffer=download)

    __call__ = translate

    def _translate_host(self, images: Any, domains: Any) -> Any:
        """The host fast path (module docstring); None when this call does not qualify for it."""
        size = self.config.img_size
        kind = None
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                return None
            if images.shape == (size, size, 3):
                kind, batch = "single", images[None]
            elif images.ndim == 4 and images.shape[1:] == (size, size, 3) and images.shape[0] > 0:
                kind, batch = "stacked", images
        else:
            pil = sys.modules.get("PIL.Image")  # a PIL image implies PIL is imported
            if pil is not None and isinstance(images, pil.Image) and plain_rgb(images) \
                    and images.size == (size, size) and not closed_unread(images):
                try:  # lazily decoded files fail here; the general path gives the clear error
                    batch = np.asarray(images)[None]
                except (OSError, ValueError):
                    return None
                kind = "pil"
        if kind is None:
            return None
        n = batch.shape[0]
        slot = self._host_slot(n)
        if slot is None:
            return None
        row = self._target_row(domains)
        if row is not None:
            slot.weights[...] = row
        else:
            slot.weights[...] = self.domain_weights(domains, n).numpy()
        # uint8 v -> v / 127.5 - 1, as lanit_rt.images converts (float32 arithmetic).
        np.divide(batch.transpose(0, 3, 1, 2), np.float32(127.5), out=slot.image, dtype=np.float32)
        np.subtract(slot.image, np.float32(1.0), out=slot.image)
        slot.run()
        # y -> round((clamp(y, -1, 1) + 1) * 127.5), in place in the slot's output.
        output = slot.output
        np.maximum(output, np.float32(-1.0), out=output)
        np.minimum(output, np.float32(1.0), out=output)
        np.add(output, np.float32(1.0), out=output)
        np.multiply(output, np.float32(127.5), out=output)
        np.rint(output, out=output)
        result = np.empty((n, size, size, 3), np.uint8)
        np.copyto(result, output.transpose(0, 2, 3, 1), casting="unsafe")
        if kind == "stacked":
            return result
        if kind == "single":
            return result[0]
        return sys.modules["PIL.Image"].fromarray(result[0])

    def _host_slot(self, n: int):
        """This thread's HostSlot for batch n (made on first use, at most 8 batch sizes kept)."""
        slots = getattr(self._local, "host_slots", None)
        if slots is None:
            slots = self._local.host_slots = {}
        slot = slots.get(n)
        if slot is None:
            if n not in slots:
                if len(slots) >= _MAX_CACHED_SLOTS:
                    slots.pop(next(iter(slots)))
                slot = slots[n] = self.backend.host_slot(n)
        return slot

    def _target_row(self, domains: Any) -> np.ndarray | None:
        """Normalised weights [1, D] of a name, an index or a list of names, cached; None for other
        specs (dicts, arrays), which are normalised on every call."""
        if isinstance(domains, str) or (isinstance(domains, int) and not isinstance(domains, bool)):
            key = domains
        elif isinstance(domains, (list, tuple)) and domains and all(isinstance(d, str) for d in domains):
            key = ("list", tuple(domains))
        else:
            return None
        row = self._target_rows.get(key)
        if row is None:
            row = self.domain_weights(domains, 1).numpy()  # raises for unknown names
            if len(self._target_rows) >= _MAX_CACHED_TARGETS:
                self._target_rows.clear()
            self._target_rows[key] = row
        return row

    def _check_style(self, style: Any, n: int) -> torch.Tensor:
        s = self.config.style_dim
        style = _host_tensor(style, "style")
        if style.dim() == 1:
            style = style[None]
        if style.dim() != 2 or style.shape[1] != s or style.shape[0] not in (1, n):
            raise ValueError(f"style must be [{n}, {s}] (or [{s}]), got {tuple(style.shape)}")
        if not bool(torch.isfinite(style).all()):
            raise ValueError("style holds NaN or infinite values")
        return style.expand(n, s).contiguous()

    def _staging(self, raw) -> torch.Tensor | None:
        """Per-thread pinned uint8 host buffer for uploads to CUDA (None elsewhere)."""
        if self.backend.device.type != "cuda" or raw.spec.kind == "tensor" or raw.stacked is None:
            return None
        return self._pinned("upload", raw.stacked.numel())

    def _pinned_download(self, numel: int) -> torch.Tensor:
        return self._pinned("download", numel)

    def _pinned(self, name: str, numel: int) -> torch.Tensor:
        """A per-thread pinned uint8 buffer of at least `numel` elements, grown on demand. Per thread,
        so no lock: a thread's previous transfer has finished (its results reached the host) before
        its next call writes the buffer again."""
        buffer = getattr(self._local, name, None)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.uint8, pin_memory=True)
            setattr(self._local, name, buffer)
        return buffer

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run one dummy batch per size: allocates the buffers, compiles kernels and, with
        cuda_graphs=True, captures the graphs, so the first real calls are not slowed down."""
        size = self.config.img_size
        for n in batch_sizes:
            images = torch.zeros(int(n), 3, size, size, device=self.backend.device)
            if self.backend.supports_weights:
                self.translate(images, torch.ones(int(n), self.config.num_domains))
            if self.backend.supports_style:
                self.translate(images, style=torch.zeros(int(n), self.config.style_dim))

    def describe(self) -> dict[str, Any]:
        """Plain-data description (backend, device, dtype ...) for logs and benchmarks."""
        return {**self.backend.describe(), "domains": list(self.domains), "img_size": self.config.img_size}

    def __repr__(self) -> str:
        return (f"Translator({self.backend.name}, domains={list(self.domains)}, "
                f"img_size={self.config.img_size})")


def _export_onnx(model: Any, onnx_path: Path) -> None:
    """export=True: write and validate OUT.onnx and OUT.style.onnx from the loaded checkpoint. The
    exporter lives in lanit_export (imported here only, lazily: lanit_rt imports nothing from it at
    import time)."""
    if onnx_path.suffix != ".onnx":
        raise ArtifactError(f"export=True writes ONNX graphs; {onnx_path} does not end in .onnx "
                            "(write an OpenVINO IR with `lanit-export --openvino`)")
    try:
        from lanit_export.onnx_export import export_onnx
    except ImportError as err:
        raise ImportError(f"export=True needs lanit_export and the onnx extra: {err}") from None
    export_onnx(model, onnx_path, "fp32")  # validated against the PyTorch generator before it appears


def _check_precision(found: str, dtype: Any, device: torch.device | str, source: str, remedy: str) -> None:
    """For exported artifacts `dtype` only states an expectation; raise when it is not met, saying
    how to make the one asked for (`remedy`)."""
    if dtype is None:
        return
    wanted = _PRECISION_NAMES[resolve_dtype(dtype, device)]
    if wanted != found:
        raise ArtifactError(f"{source} is a {found} artifact, not the requested {wanted}; {remedy}")
