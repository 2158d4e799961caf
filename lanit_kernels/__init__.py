"""Fused ops of the generator's hot path, each with `impl="auto" | "ref" | "triton"`.

`ref` is the PyTorch reference (lanit_kernels.reference), the executable spec. `triton` is the fused
kernel; `auto` picks it when it can run (CUDA tensor, no autograd, supported shape/dtype) and falls
back to the reference otherwise. `import triton` happens only inside the Triton modules
(lanit_kernels.triton_adain, lanit_kernels.triton_conv), which lanit_kernels.dispatch loads lazily.
"""

from lanit_kernels.reference import adain_conv2d_ref, adain_ref, instance_stats, modconv2d_ref
from lanit_kernels.dispatch import (
    KernelUnsupportedError,
    adain,
    adain_conv2d,
    modconv2d,
    triton_available,
)

__all__ = [
    "adain",
    "adain_conv2d",
    "modconv2d",
    "adain_ref",
    "adain_conv2d_ref",
    "modconv2d_ref",
    "instance_stats",
    "KernelUnsupportedError",
    "triton_available",
]
