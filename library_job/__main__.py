"""The document library's jobs on Ray, locally or with ``ray job submit``:

    python -m library_job build DOCS_DIR --library LIBRARY     # index (or update) a folder of documents
    python -m library_job evaluate --model DIR --data SQUAD.json --output OUT   # open-domain evaluation
    python -m library_job mine --data SQUAD.json --output OUT   # multi-passage training data from its retrievals

Each is a thin Ray Data wrapper over :mod:`qa_common.library`.
"""

from __future__ import annotations

import argparse
import sys

from library_job import build, evaluate, mine

COMMANDS = {"build": build, "evaluate": evaluate, "mine": mine}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m library_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_flags(commands.add_parser(name, help=module.SUMMARY,
                                             description=module.__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command; exit status 2 with a one-line message for what the user can fix."""
    args = parse_args(argv)
    command = COMMANDS[args.command]
    try:
        command.run(args)
    except command.USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
