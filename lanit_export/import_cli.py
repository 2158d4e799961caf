"""`lanit-import`: a released StarGAN v2 / LANIT checkpoint -> a lanit-rt run folder.

    lanit-import CKPT --domains "blond hair,black hair,..." --out RUN
    lanit-import 100000_nets_ema.ckpt --domains lanit:celeba-hq-10 --out runs/celeba

CKPT is an official `*_nets_ema.ckpt` (read with torch.load(weights_only=True); the mapping network,
style encoder and generator). --domains names the checkpoint's domains in head order: comma-separated
texts, or `lanit:NAME` for a LANIT data set's texts as the official repository lists them
(`--list-domain-sets` prints them). RUN gets `model.safetensors` + `config.json` with the per-domain
latent style table (the mean mapping-network style over --num-z latents), ready for
`lanit-export RUN --onnx ...` and `Translator.from_checkpoint(RUN)`. LANIT's prompt-learner weights
are not needed for inference and are not imported. w_hpf > 0 models are refused.

Errors (missing or foreign file, w_hpf > 0 model, domain count mismatch) print one line
`lanit-import: error: ...` and exit 1; bad arguments, an existing checkpoint in RUN among them,
exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lanit_export.command import Parser, UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lanit-import", description=__doc__.split("\n\n")[0],
                    epilog="LANIT's prompt-learner weights are not needed for inference.")
    parser.add_argument("checkpoint", nargs="?", help="official *_nets_ema.ckpt")
    parser.add_argument("--domains", help="comma-separated domain texts in head order, or lanit:NAME")
    parser.add_argument("--out", help="run folder to write (must not hold a checkpoint)")
    parser.add_argument("--num-z", type=int, default=1000,
                        help="latents averaged into each domain's latent style (default 1000)")
    parser.add_argument("--list-domain-sets", action="store_true",
                        help="print the named LANIT domain sets and exit")
    return parser


def _run(args: argparse.Namespace) -> None:
    from lanit_export.official import LANIT_DOMAIN_SETS, convert_official, describe, resolve_domains
    from lanit_rt.checkpoint import (MODEL_FILE, check_output_file, outermost_missing, remove_unused_folders,
                                     save_checkpoint)
    from lanit_rt.style import latent_style_table

    if args.list_domain_sets:
        for name, texts in LANIT_DOMAIN_SETS.items():
            print(f"lanit:{name}: {', '.join(texts)}")
        return
    if not args.checkpoint or not args.domains or not args.out:
        raise UsageError("CKPT, --domains and --out are required")
    if args.num_z < 1:
        raise UsageError(f"--num-z must be at least 1, got {args.num_z}")
    domains = resolve_domains(args.domains)
    out = Path(args.out).expanduser()
    if (out / MODEL_FILE).exists():
        raise UsageError(f"{out} already holds a checkpoint; choose another --out or delete it")
    made = outermost_missing(out)
    check_output_file(out / MODEL_FILE)
    try:
        model = convert_official(args.checkpoint, domains)
    except BaseException:  # a foreign or damaged file: the folders made for it go again
        remove_unused_folders(out, made)
        raise
    table = latent_style_table(model.mapping, num_z=args.num_z)
    metadata = {"imported_from": str(Path(args.checkpoint).name), "source": "stargan-v2/lanit",
                "source_nets": list(model.source_keys), "num_style_z": args.num_z}
    file = save_checkpoint(out, model.config, model.generator, model.mapping, model.style_encoder,
                           latent_table=table, metadata=metadata)
    summary = ", ".join(f"{k} {v}" for k, v in describe(model.config).items())
    print(f"wrote {file} ({summary})")
    if "discriminator" in model.source_keys:
        print("note: this file holds training weights (*_nets.ckpt); the authors sample with the "
              "EMA weights in *_nets_ema.ckpt")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lanit-import`; returns the process exit status."""
    return run_command("lanit-import", build_parser(), _run, argv, "interrupted; no partial file was written")


if __name__ == "__main__":
    sys.exit(main())
