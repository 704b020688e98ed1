"""What ``python -m train_job`` and ``python -m train_job.tune`` share: the flags, and exit status 2
with a one-line message for anything the user can fix (no traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qa_common import SquadFormatError
from qa_common.features import UnsupportedTokenizerError
from train_job.config import TrainConfig, TrainJobError, add_config_flags, config_from_args
from train_job.presets import PRESETS

# Bad data, a missing file or model, an unsupported tokenizer, a run that cannot fit or would mix with another.
USER_ERRORS = (SquadFormatError, OSError, UnsupportedTokenizerError, TrainJobError)


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: ``kind(text)``, refused (a usage error) below ``minimum``."""
    def convert(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value

    convert.__name__ = kind.__name__  # what argparse calls the type in its messages
    return convert


def run_command(argv: list[str] | None, *, start: Callable[[TrainConfig, argparse.Namespace], object],
                add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                check_args: Callable[[argparse.Namespace], None] | None = None,
                preset_overrides: dict | None = None, **parser_kwargs) -> int:
    """Parse ``argv`` (flags from the chosen preset, then ``add_flags``), validate (``check_args`` raises
    ValueError for a bad flag: usage error), then ``start(config, args)``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(**parser_kwargs)
    add_config_flags(parser, _chosen_preset(argv), preset_overrides)
    if add_flags:
        add_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args, preset_overrides)
        if check_args:
            check_args(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        start(config, args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _chosen_preset(argv: list[str]) -> str:
    """The --preset in ``argv`` (so that --help shows that preset's defaults); the full parser reports a bad one."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset", default="quickstart")
    preset = peek.parse_known_args(argv)[0].preset
    return preset if preset in PRESETS else "quickstart"
