"""The feedback store (private, durable, deletable, idempotent), its export to SQuAD 2.0 and the
operator's commands."""

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from qa_common.data import read_squad
from serve_app.feedback.__main__ import main as feedback_command
from serve_app.feedback.export import TRAIN_FILE, VALIDATION_FILE, export, in_validation
from serve_app.feedback.store import STORE_FILE, Feedback, FeedbackError, FeedbackStore, Passage, Span

SECRET = "Mrs Example's warfarin dose after the INR of 4.2"  # stands for patient text
LEAFLET = Passage("p-leaflet-0", "ward/warfarin.pdf", f"Hold warfarin when the INR is above 4. {SECRET}.")
PROTOCOL = Passage("p-protocol-3", "ward/anticoagulation.docx", "Heparin is given as a bolus of 80 units per kg.")


def feedback(key="k1", verdict="right", question="When is warfarin held?", passages=(LEAFLET,), **fields):
    fields.setdefault("shown", Span(0, 28, 37) if verdict == "right" else None)
    return Feedback(token_id="3f2a9c1d", client_key=key, verdict=verdict, model_version="m-1",
                    index_version="v1", question=question, passages=tuple(passages), **fields)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_store_is_private_and_adding_is_idempotent(tmp_path):
    folder = tmp_path / "feedback"
    with FeedbackStore(folder) as store:
        first, created = store.add(feedback())
        again, created_again = store.add(feedback(verdict="wrong", shown=None))  # the same client key: a retry
        other, _ = store.add(feedback(key="k2", verdict="wrong", correction=Span(0, 0, 27)))
        [stored, corrected] = store.records()
        files = {path.name: mode(path) for path in folder.iterdir()}  # the WAL files exist while it is open
    assert created and not created_again and again == first and other != first
    assert (stored.verdict, stored.shown, stored.passages) == ("right", Span(0, 28, 37), (LEAFLET,))
    assert corrected.correction == Span(0, 0, 27) and corrected.id == other
    assert mode(folder) == 0o700
    assert files == {
        STORE_FILE: 0o600, STORE_FILE + "-wal": 0o600, STORE_FILE + "-shm": 0o600}


@pytest.mark.parametrize("fields, problem", [
    ({"verdict": "maybe"}, "verdict must be one of"),
    ({"shown": Span(0, 30, 9999)}, "shown must be a non-empty span"),
    ({"verdict": "wrong", "correction": Span(1, 0, 3)}, "correction must be a non-empty span"),
    ({"correction": Span(0, 0, 3)}, "a correction goes with the verdict 'wrong' only"),
    ({"verdict": "right", "shown": None}, "'right' needs the answer that was shown"),
    ({"passages": ()}, "feedback refers to 1-20 passages"),
    ({"question": " "}, "question must be"),
    ({"key": "k" * 201}, "client_key must be 1-200 characters"),
])
def test_a_bad_record_is_refused_naming_the_field_never_the_text(fields, problem):
    with pytest.raises(FeedbackError, match=problem) as refused:
        feedback(**fields)
    assert SECRET not in str(refused.value) and "warfarin" not in str(refused.value)


def test_deleted_feedback_is_gone_from_the_files_too(tmp_path):
    with FeedbackStore(tmp_path) as store:
        old, _ = store.add(feedback(key="old"), now=datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp())
        kept, _ = store.add(feedback(key="kept", passages=(PROTOCOL,), shown=Span(0, 0, 7)))
        gone, _ = store.add(feedback(key="gone", question="Who wrote this?"))
        assert store.delete(before=datetime(2026, 1, 1, tzinfo=timezone.utc)) == 1
        assert store.delete(ids=[gone, 12345]) == 1
        assert [record.id for record in store.records()] == [kept]
    on_disk = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    assert SECRET.encode() not in on_disk and b"Who wrote this?" not in on_disk
    assert b"Heparin is given" in on_disk  # what was kept is still there


WRITER = """
import sys
from serve_app.feedback.store import FeedbackStore, Feedback, Passage, Span
store = FeedbackStore(sys.argv[1])
passage = Passage("p", "d", "x" * 4000)
for n in range(100000):
    store.add(Feedback("t", f"key-{n}", "right", "m", None, f"question {n}?", (passage,), shown=Span(0, 0, 1)))
    print(n, flush=True)  # acknowledged
"""


def test_a_writer_killed_mid_write_loses_nothing_acknowledged(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    started = time.monotonic()
    while len(acknowledged) < 200 and time.monotonic() - started < 60:
        acknowledged.append(int(writer.stdout.readline()))
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert len(acknowledged) == 200
    acknowledged += [int(line) for line in writer.stdout.read().split()]  # printed before the kill, not yet read
    db = sqlite3.connect(tmp_path / STORE_FILE)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = db.execute("SELECT question, passages FROM feedback").fetchall()
    stored = {question for question, _ in rows}
    assert {f"question {n}?" for n in acknowledged} <= stored
    assert len(stored) <= len(acknowledged) + 1  # at most one committed whose acknowledgement the kill cut off
    assert all(len(json.loads(passages)[0]["text"]) == 4000 for _, passages in rows)  # none half-written


def test_export_resolves_each_question_and_splits_by_document(tmp_path):
    documents = [Passage(f"p{i}", f"doc-{i}.pdf", f"Drug {i} is given at {i} mg daily.") for i in range(12)]
    with FeedbackStore(tmp_path / "store") as store:
        for i, passage in enumerate(documents):
            store.add(feedback(key=f"a{i}", question=f"What dose of drug {i}?", passages=(passage,),
                               verdict="wrong", correction=Span(0, passage.text.index(f"{i} mg"), passage.text.index(" daily"))),
                      now=1000 + i)
        # The same question again, later and contradicting the first: the latest wins.
        store.add(feedback(key="again", question="what  dose of DRUG 0?", passages=(documents[0],),
                           verdict="right", shown=Span(0, 0, 6)), now=5000)
        store.add(feedback(key="nothing", question="Is drug 1 safe in pregnancy?", passages=documents[1:3],
                           verdict="not_in_documents"), now=5001)
        store.add(feedback(key="no-words", question="Why?", passages=(documents[3],), verdict="wrong"), now=5002)
        counts = export(store.records(), tmp_path / "out", validation_share=0.25, seed=7)
    assert (counts.records, counts.questions, counts.superseded, counts.contradicting) == (15, 14, 1, 1)
    assert counts.wrong_without_correction == 1
    assert sum(counts.exported.values()) == 12 + 2 and sum(counts.answerable.values()) == 12
    train = read_squad(tmp_path / "out" / TRAIN_FILE)
    validation = read_squad(tmp_path / "out" / VALIDATION_FILE)
    assert {mode(tmp_path / "out" / name) for name in (TRAIN_FILE, VALIDATION_FILE)} == {0o600}
    # No document on both sides, and each on the side its seeded hash says.
    assert not {r["title"] for r in train} & {r["title"] for r in validation}
    assert {r["title"] for r in validation} == {p.document for p in documents if in_validation(p.document, 0.25, 7)}
    assert validation and train
    by_question = {r["question"]: r for r in train + validation}
    assert by_question["what  dose of DRUG 0?"]["answers"]["text"] == ["Drug 0"]  # the later verdict
    assert "What dose of drug 0?" not in by_question
    assert by_question["What dose of drug 5?"]["answers"] == {"text": ["5 mg"], "answer_start": [19]}
    unanswerable = [r for r in train + validation if r["question"] == "Is drug 1 safe in pregnancy?"]
    assert sorted(r["title"] for r in unanswerable) == ["doc-1.pdf", "doc-2.pdf"]
    assert all(r["answers"]["text"] == [] for r in unanswerable)


def test_the_operators_commands(tmp_path, capsys):
    store_dir = tmp_path / "feedback"
    with FeedbackStore(store_dir) as store:
        store.add(feedback(key="1"))
        store.add(feedback(key="2", verdict="wrong", correction=Span(0, 0, 4)))
        store.add(feedback(key="3", verdict="not_in_documents"))
        store.add(Feedback("3f2a9c1d", "4", "right", "m-2", "v1", "Q?", (PROTOCOL,), shown=Span(0, 0, 7)))
    feedback_command(["report", "--feedback", str(store_dir)])
    report = capsys.readouterr().out
    assert "m-1" in report and "m-2" in report and "33.3%" in report and "(100.0%)" in report
    feedback_command(["export", "--feedback", str(store_dir), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "4 records on 2 questions (2 superseded" in printed and SECRET not in printed
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["records"] == 4
    feedback_command(["delete", "--feedback", str(store_dir), "--id", "1", "--id", "2"])
    assert capsys.readouterr().out.strip() == "deleted 2 records"
    feedback_command(["delete", "--feedback", str(store_dir), "--older-than-days", "1"])
    assert capsys.readouterr().out.strip() == "deleted 0 records"
    for argv in (["delete", "--feedback", str(store_dir)], ["report", "--feedback", str(tmp_path / "nowhere")]):
        with pytest.raises(SystemExit) as refused:
            feedback_command(argv)
        assert refused.value.code == 2
    assert "say what to delete" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
