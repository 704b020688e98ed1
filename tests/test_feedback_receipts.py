"""Receipts: feedback can name only an answer the service gave, with the text it was given."""

import os
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_app.feedback.receipts import KEY_ENV, KEY_FILE, ReceiptError, issue, load_or_create_key
from serve_app.feedback.request import NO_TOKEN, PassagesGone, feedback_from, parse_feedback
from serve_app.feedback.store import FeedbackError, Span
from serve_app.schemas import InvalidRequest

QUESTION = "Which drug was Qwertzuiop given?"
CONTEXT = "Qwertzuiop was given warfarin on admission because of bleeding."
PASSAGES = {"p-1": {"passage_id": "p-1", "document": "leaflet.pdf", "text": "Hold warfarin when the INR is above 4."},
            "p-2": {"passage_id": "p-2", "document": "protocol.docx", "text": "Heparin is given as a bolus."}}
SHOWN = [{"answer": "warfarin", "start": 21, "end": 29}, {"answer": "", "start": -1, "end": -1}]


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path)


def rate(key, receipt, **body):
    body = {"response_id": receipt, "question": QUESTION, "verdict": "right", "key": "k-1", **body}
    return feedback_from(parse_feedback(body), key, "3f2a9c1d", lambda ids: [PASSAGES[i] for i in ids if i in PASSAGES])


def test_the_key_is_private_made_once_and_shared_by_replicas_starting_together(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(tmp_path), range(16)))
    assert len(keys) == 1 and len(keys.pop()) == 32
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == [KEY_FILE]  # no half-made key left behind
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="is not a receipt key"):
        load_or_create_key(tmp_path)
    # On a cluster the key comes from a Secret, the same on every pod; no file is made.
    secret = os.urandom(32)
    assert load_or_create_key(tmp_path / "elsewhere", environ={KEY_ENV: secret.hex()}) == secret
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(ValueError, match="must be 64 hex characters"):
        load_or_create_key(tmp_path, environ={KEY_ENV: "not hex"})


def test_a_rating_of_an_answer_to_a_context_stores_what_was_shown(key):
    receipt = issue(key, "answer", "model-a", None, QUESTION, [CONTEXT], SHOWN)
    assert QUESTION not in receipt and "warfarin" not in receipt and "," not in receipt  # one per question in a header
    right = rate(key, receipt, context=CONTEXT)
    assert (right.verdict, right.shown, right.model_version, right.token_id) == ("right", Span(0, 21, 29), "model-a",
                                                                                  "3f2a9c1d")
    assert right.passages[0].text == CONTEXT and right.question == QUESTION
    assert right.client_key != "k-1"  # stored keyed-hashed
    fixed = rate(key, receipt, context=CONTEXT, verdict="wrong", correction={"start": 0, "end": 10})
    assert fixed.correction == Span(0, 0, 10) and fixed.passages[0].text[0:10] == "Qwertzuiop"
    nothing = rate(key, receipt, context=CONTEXT, verdict="not_in_documents", answer=1)
    assert nothing.shown is None
    body = parse_feedback({"response_id": receipt, "question": QUESTION, "context": CONTEXT, "verdict": "right",
                           "key": "k"})
    assert feedback_from(body, key, None, None).token_id == NO_TOKEN  # a service on loopback without tokens


def test_a_rating_of_a_library_answer_reads_its_passages_from_the_library(key):
    receipt = issue(key, "ask", "model-a", "v1", QUESTION, ["p-1", "p-2"], [{**SHOWN[0], "start": 5, "end": 13,
                                                                             "passage": 0}])
    right = rate(key, receipt)
    assert [p.text for p in right.passages] == [PASSAGES["p-1"]["text"], PASSAGES["p-2"]["text"]]
    assert right.passages[0].document == "leaflet.pdf" and right.index_version == "v1"
    assert right.passages[0].text[5:13] == "warfarin"
    fixed = rate(key, receipt, verdict="wrong", correction={"passage": 1, "start": 0, "end": 7})
    assert fixed.correction == Span(1, 0, 7)
    gone = issue(key, "ask", "model-a", "v1", QUESTION, ["p-1", "p-9"], SHOWN[1:])
    with pytest.raises(PassagesGone, match="no longer holds"):
        rate(key, gone, verdict="not_in_documents")


@pytest.mark.parametrize("change, error, message", [
    (lambda r: {"response_id": r[:-2] + ("AA" if not r.endswith("AA") else "BB")}, ReceiptError, "not one this service"),
    (lambda r: {"response_id": "garbage"}, ReceiptError, "not one this service"),
    (lambda r: {"question": QUESTION + " "}, ReceiptError, "not the question of that response_id"),
    (lambda r: {"context": CONTEXT.replace("warfarin", "heparin")}, ReceiptError, "context must be the context"),
    (lambda r: {"answer": 2}, FeedbackError, "answer 2 was not shown"),
    (lambda r: {"verdict": "wrong", "correction": {"start": 5, "end": 500}}, FeedbackError, "correction must be"),
    (lambda r: {"verdict": "right", "correction": {"start": 0, "end": 3}}, FeedbackError, "goes with the verdict"),
    (lambda r: {"verdict": "right", "answer": 1}, FeedbackError, "'right' needs the answer"),
])
def test_feedback_on_anything_the_service_did_not_show_is_refused(key, change, error, message):
    receipt = issue(key, "answer", "model-a", None, QUESTION, [CONTEXT], SHOWN)
    with pytest.raises(error, match=message) as refused:
        rate(key, receipt, **{"context": CONTEXT, **change(receipt)})
    assert "Qwertzuiop" not in str(refused.value)
    other_service = issue(os.urandom(32), "answer", "model-a", None, QUESTION, [CONTEXT], SHOWN)
    with pytest.raises(ReceiptError):
        rate(key, other_service, context=CONTEXT)


@pytest.mark.parametrize("body, problem", [
    ({"verdict": "fine"}, "verdict: Input should be 'right', 'wrong' or 'not_in_documents'"),
    ({"key": ""}, "key: String should have at least 1 character"),
    ({"key": "k" * 129}, "key: String should have at most 128 characters"),
    ({"answer": "0"}, "answer: Input should be a valid integer"),
    ({"correction": {"start": 0, "end": 2, "text": "x"}}, "correction.text: unknown field"),
    ({"patient": "x"}, "patient: unknown field"),
])
def test_the_feedback_body_is_strict(body, problem):
    good = {"response_id": "r", "question": QUESTION, "verdict": "right", "key": "k"}
    with pytest.raises(InvalidRequest, match=problem):
        parse_feedback({**good, **body})
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_feedback([good])
    assert parse_feedback(good).answer == 0
