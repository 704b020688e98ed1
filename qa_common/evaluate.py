"""``python -m qa_common.evaluate DATA PREDICTIONS [--na-prob-file F]``: the official SQuAD evaluation, offline.

DATA is any SQuAD-format file :func:`qa_common.data.read_squad` reads; PREDICTIONS a JSON object
``{question_id: answer_text}`` ("" for "not in this document"). Prints the metrics as JSON
(percentages, like the official scripts): SQuAD v1.1's, or SQuAD v2.0's when DATA has unanswerable
questions or a no-answer probability file is given.
"""

from __future__ import annotations

import argparse
import json
import sys

from qa_common.data import SquadFormatError, read_squad
from qa_common.metric import score_predictions


def _read_json_object(path: str, values: type, what: str) -> dict:
    with open(path, encoding="utf-8") as file:
        document = json.load(file)
    if not isinstance(document, dict) or not all(isinstance(v, values) and not isinstance(v, bool)
                                                 for v in document.values()):
        raise SquadFormatError(f"{path}: expected a JSON object of question id -> {what}")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa_common.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("data", help="SQuAD-format file with the gold answers (.json, .jsonl, .parquet, .gz)")
    parser.add_argument("predictions", help='JSON file holding {"question_id": "answer text", ...}')
    parser.add_argument("--na-prob-file", help='JSON file holding {"question_id": no-answer probability, ...} '
                        "(SQuAD 2.0: adds best_exact/best_f1 and their thresholds)")
    parser.add_argument("--na-prob-thresh", type=float, default=1.0,
                        help="predict no answer when the no-answer probability exceeds this (default: 1.0)")
    args = parser.parse_args(argv)
    try:
        records = read_squad(args.data)
        predictions = _read_json_object(args.predictions, str, "answer text")
        na_probs = None
        if args.na_prob_file:
            na_probs = _read_json_object(args.na_prob_file, (int, float), "no-answer probability")
        references = {record["id"]: record["answers"]["text"] for record in records}
        metrics = score_predictions(predictions, references, na_probs, args.na_prob_thresh)
    except (OSError, ValueError) as error:  # JSONDecodeError and SquadFormatError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    if metrics["missing"]:
        print(f"warning: {metrics['missing']} of {metrics['total']} questions have no prediction "
              "and count as wrong", file=sys.stderr)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
