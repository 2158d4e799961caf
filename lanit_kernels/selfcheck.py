"""Run the compiled Triton kernels on the current CUDA GPU and compare them with the references.

Prints one JSON object: for every op, dtype and layout the max |triton - ref| and max |ref|, plus
whether impl="auto" picked the kernel. Needs a CUDA GPU and TRITON_INTERPRET unset or 0 (under the
interpreter the kernels would run on the host). tests/test_kernels.py runs it in a subprocess.

    python -m lanit_kernels.selfcheck
    python -m lanit_kernels.selfcheck --dtypes fp16 bf16 --layouts channels_last --jsonl rows.jsonl

`--jsonl` also appends each record as one JSON line the moment it is measured (a timeout keeps
the finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _record(name: str, out: torch.Tensor, ref: torch.Tensor) -> dict:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        raise AssertionError(f"{name}: {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}")
    return {"check": name, "max_err": (out.float() - ref.float()).abs().max().item(),
            "max_ref": ref.float().abs().max().item()}


class _Records(list):
    """A list of records that also appends each one to a JSON-lines file, flushed at once."""

    def __init__(self, jsonl: Path | None):
        super().__init__()
        self.jsonl = jsonl

    def append(self, record: dict) -> None:
        super().append(record)
        if self.jsonl is not None:
            with self.jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def run_checks(seed: int = 0, dtypes=tuple(DTYPES), layouts=("nchw", "channels_last"),
               jsonl: Path | None = None) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("lanit_kernels.selfcheck needs TRITON_INTERPRET unset or 0")
    if not torch.cuda.is_available():
        raise RuntimeError("lanit_kernels.selfcheck needs a CUDA GPU")
    import lanit_kernels
    from lanit_kernels import dispatch, reference
    from lanit_rt.config import LanitConfig
    from lanit_rt.networks import Generator

    triton_adain, triton_conv = dispatch._triton_modules()
    launches = {"adain": 0, "conv": 0}
    adain_launch, conv_launch = triton_adain.adain_triton, triton_conv.conv2d_prologue_triton

    def count(key, fn):
        def wrapper(*args, **kwargs):
            launches[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    torch.manual_seed(seed)
    cuda = torch.device("cuda")
    records = _Records(jsonl)
    auto_calls = {"adain": 0, "conv": 0}  # impl="auto" calls below; each should launch a kernel
    generator_launches = {"adain": 0, "conv": 0}
    triton_adain.adain_triton = count("adain", adain_launch)
    triton_conv.conv2d_prologue_triton = count("conv", conv_launch)
    try:
        with torch.no_grad():
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for layout in layouts:
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    x = (torch.randn(3, 40, 33, 31, device=cuda) * 2 + 1).to(dtype).contiguous(
                        memory_format=fmt)
                    gamma, beta = torch.randn(3, 40, device=cuda), torch.randn(3, 40, device=cuda)
                    tag = f"{dtype_name}/{layout}"
                    records.append(_record(f"adain/{tag}", lanit_kernels.adain(x, gamma, beta),
                                           reference.adain_ref(x, gamma, beta)))
                    auto_calls["adain"] += 1
                    for ksize in (1, 3):
                        weight = (torch.randn(24, 40, ksize, ksize, device=cuda) * 0.1).to(dtype)
                        bias = torch.randn(24, device=cuda).to(dtype)
                        for upsample in (False, True):
                            out = lanit_kernels.adain_conv2d(x, gamma, beta, weight, bias, upsample=upsample)
                            ref = reference.adain_conv2d_ref(x, gamma, beta, weight, bias, upsample)
                            records.append(_record(f"adain_conv2d/k{ksize}/up{int(upsample)}/{tag}",
                                                   out, ref))
                            auto_calls["conv"] += 1
                    weight = (torch.randn(24, 40, 3, 3, device=cuda) * 0.1).to(dtype)
                    style = torch.randn(3, 40, device=cuda).to(dtype)
                    records.append(_record(f"modconv2d/{tag}", lanit_kernels.modconv2d(x, weight, style),
                                           reference.modconv2d_ref(x, weight, style)))
                    auto_calls["conv"] += 1
                config = LanitConfig(domains=("a", "b", "c"), img_size=64, base_dim=16, max_dim=64,
                                     style_dim=16)
                gen = Generator(config).eval().to(device=cuda, dtype=dtype)
                images = (torch.rand(2, 3, 64, 64, device=cuda) * 2 - 1).to(dtype)
                style = torch.randn(2, 16, device=cuda).to(dtype)
                before = dict(launches)
                out = gen(images, style, impl="triton")
                for key in launches:
                    generator_launches[key] += launches[key] - before[key]
                records.append(_record(f"generator/{dtype_name}", out, gen(images, style, impl="ref")))
    finally:
        triton_adain.adain_triton, triton_conv.conv2d_prologue_triton = adain_launch, conv_launch
    return {"device": torch.cuda.get_device_name(cuda), "tf32": triton_conv.cudnn_conv_allows_tf32(),
            "auto_calls": auto_calls,
            "auto_launches": {k: launches[k] - generator_launches[k] for k in launches},
            "records": list(records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"],
                        default=["nchw", "channels_last"])
    parser.add_argument("--jsonl", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = run_checks(dtypes=tuple(args.dtypes), layouts=tuple(args.layouts), jsonl=args.jsonl)
    except Exception as err:
        print(f"lanit_kernels.selfcheck: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
