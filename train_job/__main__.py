"""``python -m train_job``: fine-tune an extractive QA model with Ray Train (default: the offline quickstart)."""

from __future__ import annotations

import argparse
import sys

from qa_common import SquadFormatError


def main(argv: list[str] | None = None) -> int:
    from train_job.config import add_config_flags, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m train_job",
        description="Fine-tune a BERT-style model for extractive QA on SQuAD-format data with Ray Train, "
        "evaluate it (EM/F1) on the whole validation split and export a Hugging Face model directory.",
        epilog="Presets: quickstart (offline: packaged all-MiniLM-L6-v2 + the bundled clinical sample, CPU) and "
        "squad-bert-base (the seed recipe: bert-base-cased on SQuAD v1.1, bf16, GPU workers).",
    )
    add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    from train_job.run import run

    try:
        run(config)
    except (SquadFormatError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
