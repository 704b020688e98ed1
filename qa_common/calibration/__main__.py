"""``python -m qa_common.calibration MODEL_DIR --validation-file FILE [--over-passages]``."""

from __future__ import annotations

import argparse
import sys

from qa_common import calibration
from qa_common.calibration.paragraphs import calibrate, describe
from qa_common.calibration.passages import calibrate_passages, passage_groups


def main(argv: list[str] | None = None) -> int:
    import json

    from qa_common.backends import BACKENDS, load_runner
    from qa_common.config import load_qa_config, save_qa_config
    from qa_common.data import read_squad

    parser = argparse.ArgumentParser(prog="python -m qa_common.calibration",
                                     description=calibration.__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a model directory (Hugging Face files and qa_config.json)")
    parser.add_argument("--validation-file", required=True,
                        help="SQuAD-format questions the model did not train on (with unanswerable ones for an "
                             "abstaining model)")
    parser.add_argument("--over-passages", action="store_true",
                        help="fit the calibration a library's answers use (passages_calibration): each question "
                             "read over its retrieved passages, as `python -m library_job mine` writes them")
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="the backend that answers (default: torch)")
    args = parser.parse_args(argv)
    try:
        records = read_squad(args.validation_file)
        groups = passage_groups(records) if args.over_passages else None
        config = load_qa_config(args.model_dir)
        runner, tokenizer, _ = load_runner(args.model_dir, args.backend)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if groups is not None:
        calibrated, report = calibrate_passages(runner, tokenizer, groups, config)
        print(f"over passages ({len(groups)} questions): ", end="")
    else:
        calibrated, report = calibrate(runner, tokenizer, records, config)
    save_qa_config(calibrated, args.model_dir)
    print(describe(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
