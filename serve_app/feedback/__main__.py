"""The operator's commands on the feedback store, run where the store lives (never over HTTP).

    python -m serve_app.feedback export --feedback DIR --output runs/feedback-export
    python -m serve_app.feedback report --feedback DIR
    python -m serve_app.feedback delete --feedback DIR --id 12 --id 40
    python -m serve_app.feedback delete --feedback DIR --older-than-days 365   # the retention period
    python -m serve_app.feedback delete --feedback DIR --before 2026-01-01

The store holds patient text: these commands print counts and ids only.
"""

import argparse
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from serve_app.feedback.export import TRAIN_FILE, VALIDATION_FILE, export
from serve_app.feedback.store import STORE_FILE, VERDICTS, FeedbackStore

FEEDBACK_HELP = f"the feedback folder the service writes (it holds {STORE_FILE})"


def _date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a date: use YYYY-MM-DD or an ISO 8601 time, e.g. 2026-01-01") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m serve_app.feedback", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write SQuAD 2.0 training and validation files, split by document")
    out.add_argument("--output", required=True, type=Path,
                     help=f"folder for {TRAIN_FILE} and {VALIDATION_FILE} (0600: they hold patient text)")
    out.add_argument("--validation-share", type=_share, default=0.2,
                     help="share of the documents whose feedback goes to validation (default: 0.2)")
    out.add_argument("--seed", type=int, default=0, help="which documents go to validation (default: 0)")
    commands.add_parser("report", help="rated answers per model version: how many right, wrong, not in the documents")
    delete = commands.add_parser("delete", help="delete records by id, or all given before a date")
    delete.add_argument("--id", type=_positive, action="append", default=[], help="a record id (repeatable)")
    when = delete.add_mutually_exclusive_group()
    when.add_argument("--before", type=_date, help="delete every record given before this date (UTC unless said)")
    when.add_argument("--older-than-days", type=_positive, help="delete every record older than N days (retention)")
    for command in commands.choices.values():
        command.add_argument("--feedback", required=True, type=Path, help=FEEDBACK_HELP)
    return top


def main(argv=None) -> None:
    flags = parser().parse_args(argv)
    if not (flags.feedback / STORE_FILE).is_file():
        print(f"error: {flags.feedback} holds no {STORE_FILE}; give the folder the service was started with "
              "(--feedback)", file=sys.stderr)
        sys.exit(2)
    with FeedbackStore(flags.feedback) as store:
        if flags.command == "export":
            counts = export(store.records(), flags.output, validation_share=flags.validation_share, seed=flags.seed)
            print(f"{counts.records} records on {counts.questions} questions ({counts.superseded} superseded by a "
                  f"later record on the same question: the latest wins; {counts.contradicting} questions had "
                  f"contradicting records; {counts.wrong_without_correction} 'wrong' without the right words, "
                  "not exported)")
            for split, name in (("train", TRAIN_FILE), ("validation", VALIDATION_FILE)):
                print(f"{split}: {counts.exported[split]} questions ({counts.answerable[split]} answerable) from "
                      f"{counts.documents[split]} documents -> {flags.output / name}")
        elif flags.command == "report":
            print(f"{'model version':<40} {'rated':>6} " + " ".join(f"{v:>17}" for v in VERDICTS))
            for version, verdicts in sorted(store.verdicts_by_model().items()):
                total = sum(verdicts.values())
                print(f"{version:<40} {total:>6} " + " ".join(
                    f"{verdicts[v]:>7} ({verdicts[v] / total:6.1%})" for v in VERDICTS))
        else:
            if not flags.id and flags.before is None and flags.older_than_days is None:
                print("error: say what to delete: --id, --before or --older-than-days", file=sys.stderr)
                sys.exit(2)
            before = flags.before or (datetime.now(timezone.utc) - timedelta(days=flags.older_than_days)
                                      if flags.older_than_days else None)
            print(f"deleted {store.delete(ids=flags.id, before=before)} records")


if __name__ == "__main__":
    main()
