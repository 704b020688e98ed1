"""``python -m train_job``: fine-tune an extractive QA model with Ray Train (default: the offline quickstart)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from train_job.cli import run_command

    def start(config, args):
        from train_job.run import run

        run(config)

    return run_command(
        argv, start=start, prog="python -m train_job",
        description="Fine-tune a BERT-style model for extractive QA on SQuAD-format data with Ray Train, "
        "evaluate it (EM/F1) on the whole validation split and export a Hugging Face model directory.",
        epilog="Presets: quickstart (offline: packaged all-MiniLM-L6-v2 + the bundled clinical sample, CPU), "
        "squad-minilm (a SQuAD model worth serving, under an hour on a 2-core CPU), feedback (one round of "
        "clinicians' feedback: the served model on `python -m serve_app.feedback export`'s files, SQuAD mixed in "
        "with --mix-file) and squad-bert-base (the seed recipe: bert-base-cased on SQuAD v1.1, bf16, GPU workers). "
        "The defaults shown are those of the preset given (python -m train_job --preset NAME --help).",
    )


if __name__ == "__main__":
    sys.exit(main())
