"""Feedback becomes SQuAD 2.0 training data, split by document.

Each question's feedback is resolved first, then turned into questions:

- **One question, one verdict: the latest wins.** Records on the same question (its text, case and
  spacing aside) about the same passages are one question; the newest record decides it and the
  older ones are counted as superseded (``contradicting`` counts the questions whose records
  disagreed: another verdict or other words).
- ``right``: the answer shown is the answer; ``wrong`` with the right words selected: those words;
  ``wrong`` without them teaches nothing and is counted, not exported; ``not_in_documents``: the
  question is unanswerable in every passage that was read (one SQuAD 2.0 question per passage).
- **Split by document.** A document goes to validation when a seeded hash of its id falls in the
  validation share, so it stays on the same side as feedback grows: a model trained on one export's
  training split never saw a later export's validation documents, and the gate judges it on
  documents it did not train on. With two or more documents, validation gets at least one.

The files hold patient text: they are written 0600 and nothing of them is printed or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.feedback.store import Feedback

TRAIN_FILE = "train.json"
VALIDATION_FILE = "validation.json"
SUMMARY_FILE = "summary.json"  # counts only


@dataclass
class ExportCounts:
    records: int = 0
    questions: int = 0
    superseded: int = 0
    contradicting: int = 0
    wrong_without_correction: int = 0
    exported: Counter = field(default_factory=Counter)  # "train"/"validation" -> SQuAD questions
    answerable: Counter = field(default_factory=Counter)
    documents: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"records": self.records, "questions": self.questions, "superseded": self.superseded,
                "contradicting": self.contradicting, "wrong_without_correction": self.wrong_without_correction,
                "exported": dict(self.exported), "answerable": dict(self.answerable),
                "documents": dict(self.documents)}


def question_key(feedback: Feedback) -> tuple:
    """Which records are about the same question: its words (case and spacing aside) over the same passages."""
    return " ".join(feedback.question.lower().split()), tuple(p.passage_id for p in feedback.passages)


def outcome(feedback: Feedback) -> tuple:
    """What a record says, for telling whether records on one question contradict each other."""
    if feedback.verdict == "not_in_documents":
        return ("none",)
    span = feedback.shown if feedback.verdict == "right" else feedback.correction
    return ("span", feedback.passages[span.passage].passage_id, span.start, span.end) if span else ("wrong",)


def resolve(records: Iterable[Feedback], counts: ExportCounts) -> list[Feedback]:
    """The deciding record of each question (the latest: records come oldest first), in question order."""
    by_question: dict[tuple, list[Feedback]] = defaultdict(list)
    for record in records:
        by_question[question_key(record)].append(record)
        counts.records += 1
    counts.questions = len(by_question)
    latest = []
    for group in by_question.values():
        counts.superseded += len(group) - 1
        counts.contradicting += len({outcome(record) for record in group}) > 1
        latest.append(max(group, key=lambda record: (record.created_at or 0, record.id or 0)))
    return latest


def _draw(document: str, seed: int) -> float:
    """The document's seeded place in [0, 1): the same in every export."""
    digest = hashlib.sha256(f"{seed}:{document}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_validation(document: str, share: float, seed: int) -> bool:
    return _draw(document, seed) < share


def squad_questions(feedback: Feedback) -> list[tuple[str, dict]]:
    """(document, SQuAD record) pairs for one resolved record: none for 'wrong' without the right words."""
    base = {"id": f"feedback-{feedback.id}", "question": feedback.question}
    if feedback.verdict == "not_in_documents":
        return [(p.document, {**base, "id": f"{base['id']}-{i}", "context": p.text, "title": p.document,
                              "answers": {"text": [], "answer_start": []}, "is_impossible": True})
                for i, p in enumerate(feedback.passages)]
    span = feedback.shown if feedback.verdict == "right" else feedback.correction
    if span is None:
        return []
    passage = feedback.passages[span.passage]
    return [(passage.document, {**base, "context": passage.text, "title": passage.document,
                                "answers": {"text": [passage.text[span.start:span.end]], "answer_start": [span.start]},
                                "is_impossible": False})]


def split_by_document(records: Iterable[Feedback], *, validation_share: float, seed: int
                      ) -> tuple[dict[str, list[dict]], ExportCounts]:
    """{"train": [...], "validation": [...]} SQuAD records, and the counts."""
    counts = ExportCounts()
    pairs = []
    for record in resolve(records, counts):
        made = squad_questions(record)
        counts.wrong_without_correction += not made
        pairs.extend(made)
    documents = sorted({document for document, _ in pairs})
    validation = {d for d in documents if in_validation(d, validation_share, seed)}
    if not validation and len(documents) >= 2 and validation_share > 0:
        validation = {min(documents, key=lambda d: _draw(d, seed))}
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for document, squad in pairs:
        split = "validation" if document in validation else "train"
        splits[split].append(squad)
        counts.exported[split] += 1
        counts.answerable[split] += not squad["is_impossible"]
    counts.documents.update({"validation": len(validation), "train": len(documents) - len(validation)})
    return splits, counts


def as_squad_v2(records: list[dict]) -> dict:
    """The official nested SQuAD 2.0 layout: one article per document, one paragraph per passage text."""
    articles: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        answers = [{"text": t, "answer_start": s}
                   for t, s in zip(record["answers"]["text"], record["answers"]["answer_start"])]
        articles[record["title"]][record["context"]].append(
            {"id": record["id"], "question": record["question"], "answers": answers,
             "is_impossible": record["is_impossible"]})
    return {"version": "v2.0", "data": [
        {"title": title, "paragraphs": [{"context": context, "qas": qas} for context, qas in paragraphs.items()]}
        for title, paragraphs in articles.items()]}


def write_private_json(path: Path, document: dict) -> None:
    """Write ``document`` to ``path`` as a new 0600 file, atomically (a reader never sees half of it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        json.dump(document, out, ensure_ascii=False)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)


def export(records: Iterable[Feedback], output: Path, *, validation_share: float = 0.2, seed: int = 0) -> ExportCounts:
    """Write ``output``/train.json and validation.json (SQuAD 2.0) and summary.json (counts)."""
    splits, counts = split_by_document(records, validation_share=validation_share, seed=seed)
    write_private_json(output / TRAIN_FILE, as_squad_v2(splits["train"]))
    write_private_json(output / VALIDATION_FILE, as_squad_v2(splits["validation"]))
    write_private_json(output / SUMMARY_FILE, counts.as_dict())
    return counts
