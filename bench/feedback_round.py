"""One round of clinicians' feedback, simulated through the real service and measured end to end.

    python -m bench.feedback_round --model runs/squad-minilm/model --seeds 0,1,2      # the clinical sample
    python -m bench.feedback_round --model runs/squad-minilm/model --questions SQUAD_DEV --articles 20 \
        --eval-questions 500 --out bench/results/feedback_round_squad.json             # SQuAD dev articles

Every paragraph of ``--questions`` becomes a document of one library (``python -m library_job build``,
as ``library_job evaluate`` does). Per seed, the documents are drawn into trained and held-out halves;
``--feedback-share`` of a trained document's questions are asked through ``POST /v1/ask`` and rated
through ``POST /v1/feedback`` as a clinician who knows the gold answer would
(``bench.simulated_clinicians``), one in ``--not-said-every`` asked of another trained document only and
marked "the documents do not say". Then the round a hospital runs: ``python -m serve_app.feedback
export`` -> ``python -m train_job --preset feedback`` (from the served model, mixed with SQuAD) ->
``python -m serve_app update`` (gated on the export's validation documents and a SQuAD dev slice). The
other questions are asked through ``/v1/ask`` before and after: new questions about the trained
documents, and the held-out documents' questions. A model the gate refuses is served anyway afterwards
and asked the same questions (``candidate``), so that what the round's training did is measured either
way. Both models are scored on ``--squad-questions`` other SQuAD dev questions, as served and always
answering. Reported: EM/F1 per group, the gate's figures, each step's time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

from bench import benchlib, models
from bench.local_service import free_port, serve_app_config
from bench.simulated_clinicians import GROUPS, ask_all, score, send_feedback, split

DEFAULT_OUT = benchlib.RESULTS / "feedback_round_clinical.json"
CLINICAL = [benchlib.QUICKSTART_TRAIN, benchlib.QUICKSTART_VALIDATION]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the served model (the SQuAD preset's OUTPUT_DIR/model)")
    parser.add_argument("--questions", type=Path, nargs="+", default=CLINICAL,
                        help="SQuAD-format files with gold answers (default: the bundled clinical sample)")
    parser.add_argument("--articles", type=int, default=None, help="only the first N articles (titles)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one round each (default: %(default)s)")
    parser.add_argument("--feedback-share", type=float, default=0.5,
                        help="share of a trained document's questions sent as feedback (default: %(default)s)")
    parser.add_argument("--not-said-every", type=int, default=5,
                        help="one feedback question in N is asked of another document and marked 'do not say'")
    parser.add_argument("--eval-questions", type=int, default=None, help="at most N questions asked per group")
    parser.add_argument("--mix-file", type=Path, default=benchlib.SQUAD_FULL_TRAIN, help="SQuAD mixed into training")
    parser.add_argument("--train-flags", default="", help="python -m train_job flags over its feedback preset's")
    parser.add_argument("--squad-dev", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD dev file")
    parser.add_argument("--gate-questions", type=int, default=500, help="SQuAD dev slice of the gate (--validate-on)")
    parser.add_argument("--squad-questions", type=int, default=2000, help="SQuAD dev questions both models answer")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    return parser.parse_args(argv)


def load_questions(args) -> list[dict]:
    from qa_common import read_squad

    records = [record for path in args.questions for record in read_squad(path)]
    if args.articles:
        titles = list(dict.fromkeys(record.get("title") or "" for record in records))[: args.articles]
        records = [record for record in records if (record.get("title") or "") in set(titles)]
    return records


def squad_f1(model_dir: str, records: list[dict]) -> dict:
    """EM/F1 of ``model_dir`` on SQuAD records as served (its qa_config: abstaining at its threshold)
    and always answering."""
    import dataclasses

    from qa_common import Question, answer_questions, load_model_and_tokenizer, load_qa_config, squad_metrics

    model, tokenizer = load_model_and_tokenizer(model_dir)
    served = load_qa_config(model_dir)
    questions = [Question(r["question"], r["context"]) for r in records]
    gold = {r["id"]: r["answers"]["text"] for r in records}
    scores = {}
    always = dataclasses.replace(served, version_2_with_negative=False)
    for name, qa in (("as_served", served), ("always_answering", always)):
        answers = answer_questions(model.eval(), tokenizer, questions, qa)
        scores[name] = squad_metrics({r["id"]: a[0]["answer"] for r, a in zip(records, answers)}, gold)
    return scores


def write_squad(records: list[dict], path: Path) -> Path:
    """``records`` as a SQuAD 2.0 file, in the layout the feedback export writes."""
    from serve_app.feedback.export import as_squad_v2

    path.write_text(json.dumps(as_squad_v2([{**r, "title": r.get("title") or "slice",
                                              "is_impossible": not r["answers"]["text"]} for r in records])),
                    encoding="utf-8")
    return path


def one_round(args, seed: int, records: list[dict], documents: dict[str, str], library: Path, squad: dict,
              workdir: Path) -> dict:
    from serve_app.app import run_config
    from serve_app.auth import hash_token
    from train_job.__main__ import main as train

    times, last = {}, [benchlib.Stopwatch()]

    def clock() -> float:  # seconds since the last call
        seconds, last[0] = last[0](), benchlib.Stopwatch()
        return seconds

    groups = split(records, documents, feedback_share=args.feedback_share, eval_questions=args.eval_questions,
                   seed=seed)
    token = "bench-" + os.urandom(16).hex()
    (workdir / f"hashes-{seed}.txt").write_text(hash_token(token) + "\n", encoding="utf-8")
    feedback = workdir / f"feedback-{seed}"
    config = serve_app_config(args.model, free_port(), max_batch_size=8, replica_cpus=1, library=library)
    [app] = config["applications"]
    app["args"].update(feedback=str(feedback), token_hashes_file=str(workdir / f"hashes-{seed}.txt"))
    url = run_config(config).rstrip("/")
    times["deploy_s"] = clock()

    def asked(name: str) -> dict:
        bodies = [{"question": r["question"]} for r in groups[name]]
        return score(groups[name], asyncio.run(ask_all(url, token, bodies)))

    before = {name: asked(name) for name in GROUPS}
    times["ask_before_s"] = clock()
    trained = sorted({record["document"] for record in groups["feedback"]})  # held-out documents stay unseen
    sent = send_feedback(url, token, groups["feedback"], trained, not_said_every=args.not_said_every, seed=seed)
    times["feedback_s"] = clock()
    print(f"[bench] seed {seed}: {len(groups['feedback'])} feedback questions sent: {sent}", flush=True)

    from serve_app.feedback.__main__ import main as feedback_command

    exported = workdir / f"export-{seed}"
    assert feedback_command(["export", "--feedback", str(feedback), "--output", str(exported), "--seed", str(seed)]) in (0, None)
    times["export_s"] = clock()
    run = workdir / f"round-{seed}"
    assert train(["--preset", "feedback", "--model", args.model, "--train-file", str(exported / "train.json"),
                  "--validation-file", str(exported / "validation.json"), "--mix-file", str(args.mix_file),
                  "--output-dir", str(run), "--seed", str(seed), *args.train_flags.split()]) == 0
    times["train_s"] = clock()
    import ray

    def update(*gate_flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve_app", "update", "--address",
                               ray.get_runtime_context().gcs_address, "--model", str(run / "model"), *gate_flags],
                              capture_output=True, text=True, cwd=benchlib.REPO)

    gate = update("--improve-on", str(exported / "validation.json"), "--validate-on", str(squad["gate_file"]),
                  "--max-f1-drop", "1")
    times["gate_and_update_s"] = clock()
    figures = [float(f) for f in re.findall(r"model's (-?[\d.]+)", gate.stdout)]
    if gate.returncode != 0:  # what the refused model would have answered: served without the gate, then scored
        assert update().returncode == 0
    candidate = {name: asked(name) for name in GROUPS}
    after = candidate if gate.returncode == 0 else before
    times["ask_after_s"] = clock()
    from ray import serve

    serve.delete(app["name"])
    dev = {"before": squad["before"], "after": squad_f1(str(run / "model"), squad["records"])}
    times["squad_dev_s"] = clock()
    times["round_s"] = sum(times[k] for k in ("export_s", "train_s", "gate_and_update_s"))
    return {"seed": seed, "feedback_questions": len(groups["feedback"]), "feedback_sent": sent,
            "export": json.loads((exported / "summary.json").read_text()), "updated": gate.returncode == 0,
            "gate": {"returncode": gate.returncode, "f1_new_vs_serving": figures,
                     "refusal": gate.stderr.strip().splitlines()[-2:] if gate.returncode else []},
            "before": before, "after": after, "gain_f1": {n: after[n]["f1"] - before[n]["f1"] for n in GROUPS},
            "candidate": candidate, "candidate_gain_f1": {n: candidate[n]["f1"] - before[n]["f1"] for n in GROUPS},
            "squad_dev": {**dev, "f1_change": dev["after"]["as_served"]["f1"] - dev["before"]["as_served"]["f1"]}, "times_s": times}


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-feedback-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    from library_job.__main__ import main as library_job
    from library_job.squad_library import paragraph_documents
    from qa_common import read_squad
    from qa_common.splits import sample_questions

    records = load_questions(args)
    documents = paragraph_documents(records)
    for name, text in documents.items():
        (workdir / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / "docs" / name).write_text(text, encoding="utf-8")
    # SQuAD dev questions about the library's own paragraphs (a round of SQuAD dev articles) stay out.
    library = {record["context"] for record in records}
    dev = sample_questions([r for r in read_squad(args.squad_dev) if r["context"] not in library],
                           args.gate_questions + args.squad_questions, seed=0, how="spread")
    random.Random(0).shuffle(dev)  # two disjoint slices, each spread over the articles
    squad = {"gate_file": write_squad(dev[: args.gate_questions], workdir / "gate-slice.json"),
             "records": dev[args.gate_questions :]}
    print(f"[bench] {len(records)} questions over {len(documents)} documents; SQuAD dev: {len(squad['records'])} "
          f"questions scored, {args.gate_questions} for the gate", flush=True)
    clock = benchlib.Stopwatch()
    squad["before"] = squad_f1(args.model, squad["records"])
    squad_before_s = clock()
    rounds = []
    with benchlib.local_ray(args.cpus):
        library = workdir / "library"
        assert library_job(["build", str(workdir / "docs"), "--library", str(library)]) == 0
        for seed in [int(s) for s in args.seeds.split(",")]:
            rounds.append(one_round(args, seed, records, documents, library, squad, workdir))
            print(json.dumps({k: rounds[-1][k] for k in ("seed", "updated", "gain_f1", "squad_dev")}, default=str),
                  flush=True)
    gains = {name: [r["gain_f1"][name] for r in rounds] for name in GROUPS}
    candidate_gains = {name: [r["candidate_gain_f1"][name] for r in rounds] for name in GROUPS}
    ratios = {**{f"{name}_f1_gain_mean": round(sum(v) / len(v), 2) for name, v in gains.items()},
              **{f"{name}_candidate_f1_gain_mean": round(sum(v) / len(v), 2) for name, v in candidate_gains.items()},
              "squad_dev_f1_change_mean": round(sum(r["squad_dev"]["f1_change"] for r in rounds) / len(rounds), 2),
              "round_s_median": benchlib.median([r["times_s"]["round_s"] for r in rounds])}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    rows = [{"seed": r["seed"], "updated": r["updated"], "feedback": r["feedback_questions"],
             **{f"{n} before": round(r["before"][n]["f1"], 1) for n in GROUPS},
             **{f"{n} candidate": round(r["candidate"][n]["f1"], 1) for n in GROUPS},
             "gate new/served": "/".join(f"{f:.1f}" for f in r["gate"]["f1_new_vs_serving"][:2]),
             "squad dev change": round(r["squad_dev"]["f1_change"], 2), "round_s": round(r["times_s"]["round_s"])}
            for r in rounds]
    benchlib.print_table("One round of feedback (end-to-end F1 through /v1/ask)", rows, list(rows[0]))
    settings = {key: (str(v) if isinstance(v, Path) else [str(p) for p in v] if isinstance(v, list) else v)
                for key, v in vars(args).items() if key != "out"}
    settings.update(questions_total=len(records), documents=len(documents), squad_before_s=squad_before_s,
                    model=models.model_summary(args.model))
    benchlib.write_json(args.out, "feedback_round", ratios, {"rounds": rounds, "squad_dev_before": squad["before"]},
                        settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
