"""A trained model on a whole SQuAD dev set: as served, always answering, abstaining, calibrated.

    python -m bench.squad_accuracy --model runs/squad-minilm/model            # full SQuAD v1.1 dev (10,570)
    python -m bench.squad_accuracy --model DIR --max-questions 1000            # a seeded sample, quicker

One forward pass per question and test set; every figure below is decoded from the same logits:

- ``dev``: the dev set as it is (every question answerable). EM/F1 as served (the model's
  ``qa_config.json``: its no-answer threshold and calibration) and always answering (the best span).
- ``dev, half unanswerable (same article)`` / ``(other article)``: a seeded half of the questions
  moved onto another paragraph holding none of their answers, of the same article or of another
  one (:func:`qa_common.synthesise_negatives`). The official SQuAD 2.0 metrics as served and always
  answering, and the ROC AUC of the no-answer probability (can any threshold tell the two apart?).
- calibration, on every set: the expected calibration error of ``score`` (is the top answer exactly
  right?) and of ``no_answer_probability`` (is the question unanswerable?), uncalibrated and as
  served, with a reliability diagram (``--plot``). ``--cross-fit K`` adds the score's ECE under an
  isotonic map (:func:`qa_common.calibration.fit_score_map`) cross-fitted over K folds of whole
  articles: every question's score mapped by a map fitted on the other folds' articles only.

The threshold and the calibration were chosen by training on its own validation split (articles held
out of the training data), never on these questions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import benchlib

DEFAULT_OUT = benchlib.RESULTS / "squad_accuracy.json"
CHUNK = 256  # questions per step of the progress bar
SET_LABELS = {"article": "same article", "other": "another article"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.squad_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (train_job's OUTPUT_DIR/model)")
    parser.add_argument("--dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD-format dev file")
    parser.add_argument("--max-questions", type=int, default=None, help="a seeded sample spread over the articles")
    parser.add_argument("--sets", default="dev,article,other",
                        help="comma-separated: dev, article (half moved within the article), other (to another)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="write the reliability diagram (PNG) here")
    parser.add_argument("--cross-fit", type=int, default=None, metavar="K",
                        help="also the score's ECE with an isotonic map cross-fitted over K folds of articles")
    return parser.parse_args(argv)


def test_sets(records: list[dict], names: list[str], seed: int) -> dict[str, list[dict]]:
    from bench.abstention_accuracy import half_unanswerable

    return {"dev" if name == "dev" else f"half unanswerable ({SET_LABELS[name]})":
            records if name == "dev" else half_unanswerable(records, records, seed, source=name) for name in names}


def answer_rows(model, tokenizer, records: list[dict], config) -> list[dict]:
    """Per question, decoded twice from one forward pass: uncalibrated and as served."""
    from tqdm import tqdm

    from qa_common import Question
    from qa_common.calibration import top_answer_correct, uncalibrated
    from qa_common.decoding import NULL_SPAN, rank_candidates
    from qa_common.inference import question_logits

    raw = uncalibrated(config)
    rows, progress = [], tqdm(total=len(records), desc="questions", unit="q")
    for begin in range(0, len(records), CHUNK):
        chunk = records[begin : begin + CHUNK]
        progress.update(len(chunk))
        questions = [Question(r["question"], r["context"]) for r in chunk]
        for record, (start, end, offsets, _) in zip(chunk, question_logits(model, tokenizer, questions, config)):
            context, golds = record["context"], record["answers"]["text"]
            before, served = (rank_candidates(start, end, offsets, c) for c in (raw, config))
            best_span = next((s for s in before.spans if s != NULL_SPAN), None)
            top = served.spans[0] if served.spans else NULL_SPAN
            rows.append({
                "id": record["id"], "title": record.get("title", ""), "golds": golds,
                "served": context[top[0] : top[1]] if top != NULL_SPAN else "",
                "always": context[best_span[0] : best_span[1]] if best_span else "",
                "score_before": float(before.scores()[0]) if before.spans else 0.0,
                "score_after": float(served.scores(config)[0]) if served.spans else 0.0,
                "correct": top_answer_correct(served, context, golds),
                "no_answer_before": before.no_answer_probability, "no_answer_after": served.no_answer_probability,
            })
    progress.close()
    return rows


def cross_fitted_scores(rows: list[dict], folds: int, seed: int) -> list[float]:
    """Each row's uncalibrated score through an isotonic map fitted on the rows of the other folds'
    articles (articles dealt to ``folds`` folds at random, seeded)."""
    import random

    import numpy as np

    from qa_common import QAConfig
    from qa_common.calibration import fit_score_map
    from qa_common.decoding import calibrated_scores

    titles = sorted({r["title"] for r in rows})
    random.Random(seed).shuffle(titles)
    fold = {title: i % folds for i, title in enumerate(titles)}
    mapped = [0.0] * len(rows)
    for k in range(folds):
        fitted = [r for r in rows if fold[r["title"]] != k]
        knots = fit_score_map([r["score_before"] for r in fitted], [r["correct"] for r in fitted])
        mine = [i for i, r in enumerate(rows) if fold[r["title"]] == k]
        scores = calibrated_scores(np.array([rows[i]["score_before"] for i in mine]), QAConfig(score_calibration=knots))
        for i, score in zip(mine, scores):
            mapped[i] = float(score)
    return mapped


def set_metrics(rows: list[dict], cross_fit: int | None = None, seed: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    from qa_common import squad_metrics, squad_v2_metrics
    from qa_common.calibration import expected_calibration_error, reliability

    references = {r["id"]: r["golds"] for r in rows}
    version_2 = any(not golds for golds in references.values())
    metric = squad_v2_metrics if version_2 else squad_metrics
    result = {
        "questions": len(rows), "unanswerable": sum(1 for r in rows if not r["golds"]),
        "served": metric({r["id"]: r["served"] for r in rows}, references),
        "always_answering": metric({r["id"]: r["always"] for r in rows}, references),
        "abstained": sum(1 for r in rows if r["served"] == "" and r["always"] != ""),
    }
    correct = [r["correct"] for r in rows]
    for when in ("before", "after"):
        scores = [r[f"score_{when}"] for r in rows]
        result[f"score_ece_{when}"] = expected_calibration_error(scores, correct)
        result[f"score_reliability_{when}"] = reliability(scores, correct)
    if cross_fit:
        crossed = cross_fitted_scores(rows, cross_fit, seed)
        result["score_ece_cross_fitted"] = expected_calibration_error(crossed, correct)
        result["score_reliability_cross_fitted"] = reliability(crossed, correct)
        result["cross_fit_folds"] = cross_fit
    result["mean_score_after"] = sum(r["score_after"] for r in rows) / len(rows)
    result["exact_top_answers"] = sum(correct) / len(rows)
    if version_2:
        unanswerable = [not r["golds"] for r in rows]
        result["no_answer_auc"] = float(roc_auc_score(unanswerable, [r["no_answer_after"] for r in rows]))
        for when in ("before", "after"):
            probabilities = [r[f"no_answer_{when}"] for r in rows]
            result[f"no_answer_ece_{when}"] = expected_calibration_error(probabilities, unanswerable)
            result[f"no_answer_reliability_{when}"] = reliability(probabilities, unanswerable)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, "score") for name in results] + [(name, "no_answer") for name in results
                                                        if "no_answer_reliability_before" in results[name]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for axis, (name, kind) in zip(axes[0], panels):
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
        labels = {"before": "uncalibrated", "after": "as served", "cross_fitted": "isotonic, cross-fitted by article"}
        for when, style in (("before", "o--"), ("after", "s-"), ("cross_fitted", "^-")):
            if f"{kind}_reliability_{when}" not in results[name]:
                continue
            bins = [b for b in results[name][f"{kind}_reliability_{when}"] if b["count"]]
            axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                      label=f"{labels[when]} (ECE {results[name][f'{kind}_ece_{when}']:.3f})")
        what = "top answer exactly right" if kind == "score" else "question unanswerable"
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"{kind.replace('_', ' ')} (bin mean)",
                 ylabel=f"share: {what}", title=f"{name}\n{results[name]['questions']} questions")
        axis.legend(loc="upper left", fontsize=8)
        axis.grid(alpha=0.3)
    benchlib.save_figure(figure, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    benchlib.quiet_libraries()
    import torch

    from qa_common import load_model_and_tokenizer, load_qa_config, read_squad
    from qa_common.splits import sample_questions

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = benchlib.load_average()
    records = sample_questions(read_squad(args.dev), args.max_questions, seed=args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    config = load_qa_config(args.model)
    results, rows = {}, []
    for name, questions in test_sets(records, args.sets.split(","), args.seed).items():
        clock = benchlib.Stopwatch()
        result = set_metrics(answer_rows(model.eval(), tokenizer, questions, config), args.cross_fit, args.seed)
        result["seconds"] = clock()
        results[name] = result
        served, always = result["served"], result["always_answering"]
        rows.append({"set": name, "questions": result["questions"], "F1 served": served["f1"],
                     "F1 always answering": always["f1"],
                     "HasAns F1 served": served.get("HasAns_f1", served["f1"]),
                     "HasAns F1 always": always.get("HasAns_f1", always["f1"]),
                     "no-answer AUC": result.get("no_answer_auc", "-"),
                     "score ECE before/after": f"{result['score_ece_before']:.3f}/{result['score_ece_after']:.3f}",
                     "score ECE cross-fitted": result.get("score_ece_cross_fitted", "-"),
                     "seconds": result["seconds"]})
    benchlib.print_table(f"{Path(args.model).name} on {benchlib.data_label(args.dev)}", rows, list(rows[0]))
    if args.plot:
        plot(results, args.plot)
    settings = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "qa_config": config.to_dict()}
    ratios = {f"{name}: score_ece_after": r["score_ece_after"] for name, r in results.items()}
    benchlib.write_json(args.out, "squad_accuracy", ratios, results, settings, load_before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
