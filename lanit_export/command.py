"""What the console commands (`lanit-export`, `lanit-import`, `lanit-serve`) share: an argument
parser that raises instead of printing its usage block, and one entry point that turns every
expected failure into a single `PROG: error: ...` line and an exit status."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from lanit_export.errors import ExportError
from lanit_rt.errors import first_line

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Arguments that cannot work together; the command exits with EXIT_USAGE."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def run_command(prog: str, parser: argparse.ArgumentParser,
                run: Callable[[argparse.Namespace], int | None], argv: Sequence[str] | None,
                interrupted: str = "interrupted") -> int:
    """Parse `argv` (default sys.argv[1:]), call `run(args)` and return the exit status: run's
    own (None = 0), 0 after --help, 130 on Ctrl-C, EXIT_USAGE for bad arguments and EXIT_FAILED
    for export, checkpoint, config and OS errors (the first line of their message is printed)."""
    from lanit_rt import CheckpointError, ConfigError  # noqa: PLC0415 (keeps --help fast)

    try:
        status = run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ExportError, CheckpointError, ConfigError, OSError) as err:  # OSError: disk full, ...
        text = first_line(err)
        print(f"{prog}: error: {text}", file=sys.stderr)
        return EXIT_FAILED
    return 0 if status is None else status
