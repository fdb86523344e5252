"""The `trl-rpo` command line, shaped like TRL's: this dispatcher, one module per command (`train`, `generate`,
`score`, `iterate`), argument groups declared once and composed per command (`arguments`), and one relaunch through
`accelerate launch` (`launch`). `trl-rpo`, `python -m trl_rpo` and `python -m trl_rpo.cli` run [`run`].
"""

import contextlib
import logging
import os
import sys

from . import generate, iterate, score, train
from .arguments import RPOScriptArguments, load_rpo_dataset, rename_rpo_columns
from .launch import ACCELERATE_CONFIGS, resolve_accelerate_config
from .train import main, make_parser


COMMANDS = {"generate": generate, "score": score, "iterate": iterate}  # and training, without a command name


def cli(args: list[str] | None = None) -> None:
    """Dispatch `trl-rpo [generate | score | iterate] ARGS` to the command's module; no command name trains.

    With `--accelerate_config NAME|PATH`, training and `generate` relaunch themselves through `accelerate launch`,
    like `trl kto`: the options that are not the command's own (`--num_processes 8`, `--main_process_port`, …) go
    to accelerate.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        with package_messages_shown():
            COMMANDS[argv[0]].run(argv[1:])
        return
    train.run(argv)


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (a test's capture, a redirected stream), not the one at creation."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextlib.contextmanager
def package_messages_shown():
    """While a command runs, the package's info messages (what a resume skips and what is left: "2 of 5 prompts left
    to sample", "Round 1: finished, skipped") reach stderr at the default log level; other libraries keep theirs."""
    package, handler = logging.getLogger("trl_rpo"), _StderrHandler()
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


TRACEBACK_FLAG, TRACEBACK_ENV = "--traceback", "TRL_RPO_TRACEBACK"


def run() -> None:
    """The `trl-rpo` console command: [`cli`], with a user error (a missing option, a refused resume, a bad reward
    function spec, a damaged record, a path that does not exist: the package's `ValueError`s and
    `FileNotFoundError`s) printed as one line and exit status 2, as argparse does, instead of a traceback.
    `--traceback` (or `--log_level debug`) keeps the traceback; it reaches processes relaunched through accelerate
    via the `TRL_RPO_TRACEBACK` environment variable. Errors of other kinds always keep theirs."""
    argv = sys.argv[1:]
    if TRACEBACK_FLAG in argv or _log_level(argv) == "debug":
        os.environ[TRACEBACK_ENV] = "1"
    argv = [arg for arg in argv if arg != TRACEBACK_FLAG]
    try:
        cli(argv)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"trl-rpo: error: {error}\n(add {TRACEBACK_FLAG} to see where it was raised)", file=sys.stderr)
        sys.exit(2)


def _log_level(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg.startswith("--log_level="):
            return arg.partition("=")[2]
        if arg == "--log_level" and index + 1 < len(argv):
            return argv[index + 1]
    return None


__all__ = [
    "ACCELERATE_CONFIGS",
    "COMMANDS",
    "RPOScriptArguments",
    "cli",
    "load_rpo_dataset",
    "main",
    "make_parser",
    "rename_rpo_columns",
    "resolve_accelerate_config",
    "run",
]
