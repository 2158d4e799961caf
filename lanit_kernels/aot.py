"""Compile every Triton kernel variant for a CUDA architecture without a GPU (code-generation check).

The interpreter (TRITON_INTERPRET=1) runs kernels with numpy and never checks what only the GPU
compiler does: tl.dot tile shapes and operand dtypes, register/shared-memory budgets, constexpr
branches. This compiles the kernels ahead of time for `--arch` (90 = H100, 80 = A100) with the
block sizes the launchers pick for the generator's real layer shapes and prints one JSON object.

    TRITON_INTERPRET=0 python -m lanit_kernels.aot --arch 90

Must run with TRITON_INTERPRET unset or 0 (under the interpreter @triton.jit gives functions that
cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FP32_POINTERS = ("scale_ptr", "shift_ptr", "out_scale_ptr", "gamma_ptr", "beta_ptr")

# (output pixels, C_in, C_out, k, upsample, modulated): the generator's heaviest layers at 256 px.
CONV_CASES = [
    (256 * 256, 128, 64, 3, True, False),  # last up block, conv1 (nearest x2 in the prologue)
    (256 * 256, 64, 64, 3, False, False),  # last up block, conv2
    (16 * 16, 512, 512, 3, False, False),  # bottleneck AdaIN block
    (256 * 256, 64, 3, 1, False, False),   # to_rgb 1x1
    (16 * 16, 512, 512, 3, False, True),   # modconv2d (StyleGAN2 form)
]
# (channels, H*W, channels contiguous)
ADAIN_CASES = [(64, 256 * 256, False), (64, 256 * 256, True), (512, 16 * 16, False), (3, 35, True)]


def _compile(kernel, arch: int, pointer_dtype: str, constexprs: dict, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{pointer_dtype}"
        elif name in ("eps", "negative_slope"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_all(arch: int, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                quick: bool = False) -> list[dict]:
    """Compile every kernel variant; one record per variant (kernel, dtype, blocks, shared bytes).

    `quick` keeps the upsampling and the modulated conv and the two AdaIN layouts.
    """
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("lanit_kernels.aot needs TRITON_INTERPRET unset or 0")
    from lanit_kernels import triton_adain, triton_conv

    records = []
    for dtype in dtypes:
        name = DTYPE_NAMES[dtype]
        conv_cases = [CONV_CASES[0], CONV_CASES[-1]] if quick else CONV_CASES
        adain_cases = ADAIN_CASES[:2] if quick else ADAIN_CASES
        for hw_out, c_in, c_out, ksize, upsample, modulated in conv_cases:
            phases = upsample and ksize == 3  # as the launcher does: M runs over low-res pixels
            block_m, block_n, block_k, warps, stages = triton_conv._blocks(
                hw_out // 4 if phases else hw_out, c_in, c_out, dtype)
            consts = dict(KSIZE=ksize, NUM_TAPS=4 if phases else ksize * ksize, UPSAMPLE=upsample,
                          PHASES=phases, HAS_SHIFT=not modulated,
                          HAS_ACT=not modulated, HAS_BIAS=not modulated, HAS_OUT_SCALE=modulated,
                          DOT_PRECISION=triton_conv._dot_precision(dtype), DOT_IN_FP32=False,
                          BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
            compiled = _compile(triton_conv._conv_kernel, arch, name, consts, num_warps=warps,
                                num_stages=stages)
            ptx = compiled.asm["ptx"]
            records.append(dict(kernel="conv", dtype=name, case=[hw_out, c_in, c_out, ksize, upsample,
                                                                  modulated],
                                blocks=[block_m, block_n, block_k], num_warps=warps,
                                shared=compiled.metadata.shared,
                                tensor_cores="mma" in ptx))
        for channels, hw, channels_contiguous in adain_cases:
            block_c, block_hw, warps = triton_adain._blocks(channels, hw, channels_contiguous)
            for kernel, consts in ((triton_adain._adain_kernel, dict(HAS_ACT=True)),
                                   (triton_adain._adain_coeff_kernel, {})):
                compiled = _compile(kernel, arch, name,
                                    dict(consts, BLOCK_C=block_c, BLOCK_HW=block_hw), num_warps=warps)
                records.append(dict(kernel=kernel.__name__, dtype=name,
                                    case=[channels, hw, channels_contiguous],
                                    blocks=[block_c, block_hw], num_warps=warps,
                                    shared=compiled.metadata.shared, tensor_cores=False))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90, 80")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_NAMES.values()),
                        default=["fp16", "bf16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="two conv and two AdaIN variants")
    args = parser.parse_args(argv)
    if not 70 <= args.arch <= 130:  # Triton's CUDA backend: Volta (70) and newer
        parser.error(f"--arch is a CUDA compute capability such as 80 or 90, got {args.arch}")
    by_name = {v: k for k, v in DTYPE_NAMES.items()}
    try:
        records = compile_all(args.arch, tuple(by_name[d] for d in args.dtypes), args.quick)
    except Exception as err:
        print(f"lanit_kernels.aot: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"arch": args.arch, "variants": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
