"""``python -m qa_common.evaluate DATA PREDICTIONS``: the official SQuAD v1.1 evaluation, offline.

DATA is any SQuAD-format file :func:`qa_common.data.read_squad` reads; PREDICTIONS a JSON object
``{question_id: answer_text}``. Prints the metrics as JSON (percentages, like the official script).
"""

from __future__ import annotations

import argparse
import json
import sys

from qa_common.data import SquadFormatError, read_squad
from qa_common.metric import squad_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qa_common.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("data", help="SQuAD-format file with the gold answers (.json, .jsonl, .parquet, .gz)")
    parser.add_argument("predictions", help='JSON file holding {"question_id": "answer text", ...}')
    args = parser.parse_args(argv)
    try:
        records = read_squad(args.data)
        with open(args.predictions, encoding="utf-8") as file:
            predictions = json.load(file)
        if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
            raise SquadFormatError(f"{args.predictions}: expected a JSON object of question id -> answer text")
        references = {record["id"]: record["answers"]["text"] for record in records}
        metrics = squad_metrics(predictions, references)
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
