"""Ask the library over HTTP: /v1/ask and /v1/collections, their contracts, audit lines, a rebuild
served without a restart, and the page (the library mode, and a pasted document the model abstains
on) in headless Chromium.

One service for the module: conftest's abstaining tiny model, and an index of the test library
(library_helpers: the fixture articles as PDF, DOCX, HTML and Markdown, plus a broken PDF). The same
service's /v1/answer shows the model decoding with the settings it was trained with, and abstaining
over a given context, as ``answer_questions`` does.
"""

import json
import time

import httpx
import numpy as np
import pytest
from conftest import V2_DATA, shared_ray
from library_helpers import write_library
from serve_helpers import AUTH, TOKEN, service_config, serving
from test_serve_page import ask_and_wait, headless_chromium
from test_serve_page import pytestmark as needs_chromium

from qa_common import (PassagesQuestion, Question, answer_questions, load_model_and_tokenizer, load_qa_config,
                       passage_relevance, read_squad)
from qa_common.inference import question_logits
from library_job.__main__ import main as library_job
from qa_common.library.embedding import Embedder
from qa_common.library.search import Library
from bench.local_service import free_port, wait_until
from serve_app.retriever import RETRIEVER_DEPLOYMENT


SERVED_PASSAGES = 4


@pytest.fixture(scope="module")
def service(abstaining_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("served-library")
    docs, index, audit = write_library(root / "ward"), root / "index", root / "audit.jsonl"
    model = abstaining_run[0] / "model"
    # Four passages read by default (the service's setting; the library holds five).
    config = service_config(model, free_port(), qa={}, library=str(index), audit_log=str(audit),
                            feedback=str(root / "feedback"), passages=SERVED_PASSAGES)
    config["applications"][0]["deployments"].append({"name": RETRIEVER_DEPLOYMENT, "ray_actor_options": {"num_cpus": 0.1}})
    shared_ray()
    assert library_job(["build", str(docs), "--library", str(index), "--concurrency", "1"]) == 0
    with serving(config) as url:
        yield {"url": url, "docs": docs, "index": index, "audit": audit, "model": model, "root": root,
               "feedback": root / "feedback"}


def ask(service, body, headers=AUTH):
    return httpx.post(f"{service['url']}/v1/ask", json=body, headers=headers, timeout=120)


def test_an_answer_cites_its_document_page_and_passage_and_equals_the_reader_over_the_same_passages(service):
    question = "Which spores are not killed by alcohol?"
    response = ask(service, {"question": question, "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["passages_read"] == SERVED_PASSAGES and body["index_version"] == Library(service["index"]).version
    best = body["answers"][0]
    assert set(best) == {"answer", "score", "start", "end", "no_answer_probability", "collection", "document", "page",
                         "section", "passage_id", "passage"}
    assert response.headers["X-Model-Version"]
    library = Library(service["index"])
    rows = {hit.passage["passage_id"]: hit.passage for hit in library.search("x", Embedder().embed(["x"])[0], 20,
                                                                             mode="dense")}
    for answer in (a for a in body["answers"] if a["start"] >= 0):  # each citation is its passage's row in the index
        assert answer["passage"][answer["start"]:answer["end"]] == answer["answer"]
        row = rows[answer["passage_id"]]
        assert {key: answer[key] for key in row if key != "text"} == {key: row[key] for key in row if key != "text"}
        assert answer["passage"] == row["text"]

    # The same retrieval and the same reader, outside the service: the same answers.
    hits = library.search(question, Embedder().embed([question])[0], SERVED_PASSAGES)
    model, tokenizer = load_model_and_tokenizer(str(service["model"]))
    [expected] = answer_questions(model, tokenizer, [PassagesQuestion(question, tuple(h.passage["text"] for h in hits),
                                                                      top_k=3)], load_qa_config(service["model"]))
    assert [(a["answer"], a["start"], hits[a["passage"]].passage["passage_id"] if a["passage"] >= 0 else None)
            for a in expected] == [(a["answer"], a["start"], a["passage_id"]) for a in body["answers"]]
    assert [a["score"] for a in body["answers"]] == pytest.approx([a["score"] for a in expected], abs=1e-5)
    # Every passage read is a source, where it is and not its text, the reader's strongest first: for
    # some of these questions not the search's first.
    reordered = 0
    for asked in (question, "What does INR stand for?", "Within how many hours should a clot-dissolving drug be given?",
                  "How long should hands be rubbed?"):
        sources = ask(service, {"question": asked}).json()["sources"]
        read = library.search(asked, Embedder().embed([asked])[0], SERVED_PASSAGES)
        [logits] = question_logits(model, tokenizer, [PassagesQuestion(asked, tuple(h.passage["text"] for h in read))],
                                   load_qa_config(service["model"]))
        order = np.argsort(-passage_relevance(*logits, len(read)), kind="stable")
        assert [s["passage_id"] for s in sources] == [read[p].passage["passage_id"] for p in order]
        assert all(s == {key: rows[s["passage_id"]][key] for key in s} and "passage" not in s for s in sources)
        reordered += order[0] != 0
    assert reordered

    # Asked of the PDF alone, every answer comes from it and cites the page its passage is on. (Which page the
    # tiny reader prefers depends on its training's dropout masks, so the page itself is not asserted.)
    answers = ask(service, {"question": question, "document": "hand-hygiene.pdf", "top_k": 3}).json()["answers"]
    pages = {row["passage_id"]: row["page"] for row in rows.values() if row["document"] == "hand-hygiene.pdf"}
    assert sorted(set(pages.values())) == [1, 2]
    assert answers and all(a["document"] == "hand-hygiene.pdf" and a["page"] == pages[a["passage_id"]]
                           for a in answers if a["start"] >= 0)


STROKE_QUESTIONS = ("Within how many hours should a clot-dissolving drug be given?",
                    "What does the letter A stand for in the FAST test?",
                    "What does every patient have before treatment starts?",
                    "How long does rehabilitation often continue after the patient leaves hospital?")


def test_a_question_no_document_answers_is_not_found_in_these_documents(service):
    # Only the warfarin leaflet is searched: no stroke question's answer is in the passage read. Whether the
    # tiny reader declines one such pair depends on its training's dropout masks (one flipped when training
    # batches were cut to another length), so all four are asked: each declined one is "not found", whole,
    # and each one the threshold let through is an answer from the leaflet.
    threshold = load_qa_config(service["model"]).no_answer_threshold
    not_found = []
    for question in STROKE_QUESTIONS:
        body = ask(service, {"question": question, "document": "warfarin.docx"}).json()
        [best] = body["answers"]
        assert body["passages_read"] == 1
        if best["start"] == -1:
            assert (best["answer"], best["end"], best["document"], best["passage"]) == ("", -1, None, None)
            assert best["no_answer_probability"] > threshold
            not_found.append(question)
        else:  # what the reader's threshold let through is an answer from the leaflet
            assert best["no_answer_probability"] <= threshold
            assert best["document"] == "warfarin.docx" and best["answer"]
    assert not_found  # the reader was trained to decline other articles' questions: some of these at least
    # Asked of the whole library, the first is answered from the stroke page.
    body = ask(service, {"question": STROKE_QUESTIONS[0]}).json()
    assert body["answers"][0]["document"] == "stroke.html" and body["answers"][0]["answer"]
    # A filter that matches nothing reads nothing and says so.
    body = ask(service, {"question": "What does INR stand for?", "collection": "elsewhere"}).json()
    assert body["passages_read"] == 0 and body["answers"][0]["start"] == -1 and body["sources"] == []


@pytest.mark.parametrize("body, where", [
    ({"question": "   "}, "question"),
    ({"question": "x", "passages": 21}, "passages"),
    ({"question": "x", "top_k": 0}, "top_k"),
    ({"question": "x", "collection": "../etc' OR 1=1"}, "collection"),
    ({"question": "x", "document": "d" * 513}, "document"),
    ({"question": "x", "context": "not here"}, "context: unknown field"),
    ([{"question": "x"}], "must be a JSON object"),
])
def test_bad_library_questions_get_422_saying_what_to_fix(service, body, where):
    response = ask(service, body)
    assert response.status_code == 422 and where in response.json()["error"], response.text


def test_library_routes_need_a_token_and_collections_show_no_path(service):
    assert ask(service, {"question": "x"}, headers={}).status_code == 401
    assert httpx.get(f"{service['url']}/v1/collections", timeout=30).status_code == 401
    response = httpx.get(f"{service['url']}/v1/collections", headers=AUTH, timeout=30)
    info = response.json()
    assert info["collections"] == [{"name": "ward", "documents": 4, "passages": 5}]
    assert info["index_version"] == Library(service["index"]).version
    assert str(service["root"]) not in response.text


def test_audit_lines_of_library_questions_carry_counts_and_versions_never_text(service):
    question = "What does INR stand for?"
    assert ask(service, {"question": question}).status_code == 200
    lines = [json.loads(line) for line in service["audit"].read_text().splitlines()]
    [last] = [line for line in lines if line["route"] == "/v1/ask" and line["status"] == 200][-1:]
    assert last["passages"] == SERVED_PASSAGES and last["questions"] == 1 and last["windows"] >= SERVED_PASSAGES
    assert last["index_version"] == Library(service["index"]).version
    text = service["audit"].read_text()
    for secret in (question, "warfarin.docx", "hand-hygiene", "Clostridioides"):
        assert secret not in text


def test_a_library_answer_is_rated_against_the_passages_it_was_read_from(service):
    from serve_app.feedback.store import FeedbackStore

    question = "Which spores are not killed by alcohol?"
    response = ask(service, {"question": question, "top_k": 2})
    rank, best = next((i, a) for i, a in enumerate(response.json()["answers"]) if a["start"] >= 0)
    rate = {"response_id": response.headers["x-response-id"], "question": question, "answer": rank,
            "key": f"r-{time.time_ns()}"}
    right = httpx.post(f"{service['url']}/v1/feedback", json={**rate, "verdict": "right"}, headers=AUTH, timeout=60)
    assert right.status_code == 201, right.text
    # "Not in the documents" for a question asked of one document: every passage read is stored.
    response = ask(service, {"question": "What is the dose of heparin?", "document": "warfarin.docx"})
    nothing = {"response_id": response.headers["x-response-id"], "question": "What is the dose of heparin?",
               "verdict": "not_in_documents", "key": f"n-{time.time_ns()}"}
    assert httpx.post(f"{service['url']}/v1/feedback", json=nothing, headers=AUTH, timeout=60).status_code == 201
    with_context = {**rate, "verdict": "right", "context": "x", "key": "other"}
    refused = httpx.post(f"{service['url']}/v1/feedback", json=with_context, headers=AUTH, timeout=60)
    assert refused.status_code == 422 and "context goes with feedback on /v1/answer only" in refused.text
    with FeedbackStore(service["feedback"]) as store:
        records = {record.verdict: record for record in store.records()}
    shown = records["right"].passages[records["right"].shown.passage]
    assert (shown.passage_id, shown.document, shown.text[records["right"].shown.start:records["right"].shown.end]) == (
        best["passage_id"], best["document"], best["answer"])
    assert [p.document for p in records["not_in_documents"].passages] == ["warfarin.docx"]
    assert records["right"].index_version == response.json()["index_version"]
    assert question not in service["audit"].read_text()


def test_a_rebuilt_library_is_served_without_a_restart(service, tmp_path):
    before = httpx.get(f"{service['url']}/v1/collections", headers=AUTH, timeout=30).json()
    (service["docs"] / "new-leaflet.txt").write_text("The ward phone number is 4477.")
    try:
        assert library_job(["build", str(service["docs"]), "--library", str(service["index"]),
                               "--concurrency", "1"]) == 0
        after = httpx.get(f"{service['url']}/v1/collections", headers=AUTH, timeout=30).json()
        assert after["index_version"] != before["index_version"] and after["collections"][0]["documents"] == 5
        body = ask(service, {"question": "What is the ward phone number?", "passages": 6}).json()
        assert body["index_version"] == after["index_version"] and body["passages_read"] == 6
    finally:
        (service["docs"] / "new-leaflet.txt").unlink()


# Selects the first three words of the passage on screen as a reader would with the mouse; returns them.
SELECT_FIRST_WORDS = """(() => {
    const view = document.getElementById('passage-view');
    const words = view.textContent.split(' ').slice(0, 3).join(' ');
    const walker = document.createTreeWalker(view, NodeFilter.SHOW_TEXT);
    const range = document.createRange();
    let seen = 0, node;
    while ((node = walker.nextNode())) {
        const length = node.textContent.length;
        if (seen === 0) range.setStart(node, 0);
        if (seen + length >= words.length) { range.setEnd(node, words.length - seen); break; }
        seen += length;
    }
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    return words;
})()"""


@needs_chromium
def test_the_page_asks_the_library_shows_the_cited_passage_and_takes_a_correction(service, tmp_path):
    question = "Which spores are not killed by alcohol?"
    body = ask(service, {"question": question, "top_k": 3}).json()
    expected = next(a for a in body["answers"] if a["start"] >= 0)
    with headless_chromium(service["url"] + "/", tmp_path / "profile") as page:
        page.type_into("#token", TOKEN)
        page.type_into("#question", question)  # the token's change event: the page asks for the collections
        wait_until(lambda: page.evaluate("!document.getElementById('mode-choice').hidden"), timeout_s=30,
                   what="the library mode to be offered")
        page.click("#mode-library")
        ask_and_wait(page, "library-result")
        shown = page.evaluate("""({
            status: document.getElementById('status').textContent,
            documentHidden: document.getElementById('document-field').hidden,
            first: document.querySelector('#library-answers li button').textContent,
            source: document.querySelector('#library-answers li .source').textContent,
            marked: document.querySelector('#passage-view mark').textContent,
            passageSource: document.getElementById('passage-source').textContent,
            notFound: !document.getElementById('library-not-found').hidden,
            sources: Array.from(document.querySelectorAll('#library-sources li'), (li) => li.textContent),
            sourcesShown: !document.getElementById('library-sources-block').hidden,
        })""")
        cited = [" · ".join([s["document"], *([f"page {s['page']}"] if s["page"] else []),
                             *([s["section"]] if s["section"] else [])]) for s in body["sources"]]
        assert shown["sourcesShown"] and shown["sources"] == cited
        # Wrong, and the right words selected in the passage shown: the first three words, say.
        assert page.evaluate("!document.getElementById('feedback').hidden")
        page.click("#rate-wrong")
        selected = page.evaluate(SELECT_FIRST_WORDS)
        wait_until(lambda: page.evaluate("!document.getElementById('send-correction').disabled"), timeout_s=10,
                   what="the selection to enable sending it")
        page.click("#send-correction")
        recorded = wait_until(lambda: page.evaluate("document.getElementById('feedback-status').textContent")
                              .startswith("Thank you") and page.evaluate(
                                  "document.getElementById('feedback-status').textContent"),
                              timeout_s=30, what="the rating to be recorded")
    from serve_app.feedback.store import FeedbackStore

    with FeedbackStore(service["feedback"]) as store:
        record = next(r for r in store.records() if f"(number {r.id})." in recorded)
    fix = record.correction
    assert record.verdict == "wrong" and record.passages[fix.passage].text[fix.start:fix.end] == selected
    assert shown["status"] == "" and shown["documentHidden"] and not shown["notFound"]
    assert shown["marked"] == expected["answer"] and shown["first"].startswith(expected["answer"])
    citation = " · ".join([expected["document"], *([f"page {expected['page']}"] if expected["page"] else []),
                           *([expected["section"]] if expected["section"] else [])])
    assert shown["source"] == shown["passageSource"] == citation


@needs_chromium
def test_the_page_says_not_found_and_greys_the_best_span_as_a_suggestion(service, tmp_path):
    """A pasted document the model abstains on: "Not found in this document", the best span greyed."""
    record = next(r for r in read_squad(V2_DATA) if not r["answers"]["text"])
    model, tokenizer = load_model_and_tokenizer(str(service["model"]))
    [expected] = answer_questions(model, tokenizer, [Question(record["question"], record["context"], top_k=3)],
                                  load_qa_config(service["model"]))
    assert expected[0]["start"] == -1
    suggestion = next(a for a in expected if a["start"] >= 0)

    with headless_chromium(service["url"] + "/", tmp_path / "profile") as page:
        page.type_into("#token", TOKEN)
        page.type_into("#document", record["context"])
        page.type_into("#question", record["question"])
        ask_and_wait(page)
        shown = page.evaluate("""({
            status: document.getElementById('status').textContent,
            notFound: !document.getElementById('not-found').hidden,
            notFoundText: document.getElementById('not-found').textContent,
            answerLineShown: !document.getElementById('answer-line').hidden,
            suggestion: document.getElementById('suggestion-text').textContent,
            suggestionScore: document.getElementById('suggestion-score').textContent,
            marked: document.querySelector('#document-view mark.suggestion').textContent,
            firstCandidate: document.querySelector('#answers li button').textContent,
        })""")

    assert shown["status"] == ""
    assert shown["notFound"] and "Not found in this document" in shown["notFoundText"]
    assert not shown["answerLineShown"]
    assert shown["suggestion"] == shown["marked"] == suggestion["answer"]
    assert float(shown["suggestionScore"].removesuffix("%")) == pytest.approx(100 * suggestion["score"], abs=0.051)
    assert shown["firstCandidate"].startswith("Not found in this document")


def test_the_service_decodes_with_the_settings_the_model_was_trained_with(service):
    """Served with no QA overrides, the exported model's own settings: those it was trained with (not
    QAConfig's defaults), its fitted threshold and score map, as /v1/model says and /v1/answer does."""
    from conftest import abstaining_qa

    from qa_common.config import FITTED_SETTINGS

    model_dir = service["model"]
    saved = json.loads((model_dir / "qa_config.json").read_text())
    trained = {**abstaining_qa().to_dict(), "version_2_with_negative": True}  # switched on by the negatives
    assert {name: saved[name] for name in trained if name not in FITTED_SETTINGS} == {
        name: value for name, value in trained.items() if name not in FITTED_SETTINGS}
    calibration = json.loads((model_dir.parent / "metrics.json").read_text())["calibration"]
    assert len(saved["score_calibration"]) == calibration["score_knots"] > 0  # fitted at export
    info = httpx.get(f"{service['url']}/v1/model", headers=AUTH, timeout=60).json()
    assert {name: info[name] for name in saved} == saved
    assert info["passages"] == SERVED_PASSAGES  # what /v1/ask reads unless a request says

    records = [r for r in read_squad(V2_DATA) if r["answers"]["text"]][:3]
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    expected = answer_questions(model, tokenizer, [Question(r["question"], r["context"], top_k=2) for r in records],
                                load_qa_config(model_dir))
    for record, wanted in zip(records, expected):
        body = {"question": record["question"], "context": record["context"], "top_k": 2}
        served = httpx.post(f"{service['url']}/v1/answer", json=body, headers=AUTH, timeout=60).json()
        assert [(a["answer"], a["start"], a["end"]) for a in served] == [
            (a["answer"], a["start"], a["end"]) for a in wanted]
        assert [a["score"] for a in served] == pytest.approx([a["score"] for a in wanted], rel=1e-4)


def test_a_given_context_is_answered_and_abstained_on_as_the_reader_does(service):
    """/v1/answer of the library's service: the abstaining model's no-answer, ranked answers and forced spans."""
    url = service["url"]
    unanswerable = [r for r in read_squad(V2_DATA) if not r["answers"]["text"]]
    model, tokenizer = load_model_and_tokenizer(str(service["model"]))
    config = load_qa_config(service["model"])
    info = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=60).json()
    assert info["version_2_with_negative"] is True and info["no_answer_threshold"] == config.no_answer_threshold
    for record in unanswerable:
        body = {"question": record["question"], "context": record["context"]}
        served = httpx.post(f"{url}/v1/answer", json=body, headers=AUTH, timeout=60).json()
        assert set(served) == {"answer", "score", "start", "end", "no_answer_probability"}
        assert (served["answer"], served["start"], served["end"]) == ("", -1, -1)
        assert served["score"] > 0 and served["no_answer_probability"] > config.no_answer_threshold

        ranked = httpx.post(f"{url}/v1/answer", json={**body, "top_k": 3}, headers=AUTH, timeout=60).json()
        [expected] = answer_questions(model, tokenizer, [Question(record["question"], record["context"], top_k=3)],
                                      config)
        assert [(a["answer"], a["start"], a["end"]) for a in ranked] == [
            (a["answer"], a["start"], a["end"]) for a in expected]
        assert ranked[0]["start"] == -1 and all(a["start"] >= 0 for a in ranked[1:])
        assert [a["score"] for a in ranked] == sorted((a["score"] for a in ranked), reverse=True)

        spans = httpx.post(f"{url}/v1/answer", json={**body, "allow_no_answer": False}, headers=AUTH, timeout=60).json()
        assert spans["start"] >= 0 and record["context"][spans["start"]:spans["end"]] == spans["answer"]
