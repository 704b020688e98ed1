"""The web page when the model abstains: "Not found in this document", the best span greyed as a suggestion.

Its own module (so its own local Ray and service), driven in headless Chromium like test_serve_page.
"""

import pytest
from serve_helpers import SMALL_QA, TOKEN, service_config, serving
from test_serve_page import headless_chromium, pytestmark  # noqa: F401 (pytestmark: skipped without Chromium)

from qa_common import QAConfig, Question, answer_questions
from bench.local_service import free_port, wait_until


def test_the_page_says_not_found_and_greys_the_best_span_as_a_suggestion(tiny_model_dir, fixture_records,
                                                                          tiny_model_and_tokenizer, tmp_path):
    # Threshold 0: the model abstains on every question, so the page must say so.
    always_abstains = {**SMALL_QA, "version_2_with_negative": True, "no_answer_threshold": 0.0}
    record = fixture_records[0]
    model, tokenizer = tiny_model_and_tokenizer
    [expected] = answer_questions(model, tokenizer, [Question(record["question"], record["context"], top_k=3)],
                                  QAConfig(**always_abstains))
    assert expected[0]["start"] == -1
    suggestion = next(a for a in expected if a["start"] >= 0)

    with serving(service_config(tiny_model_dir, free_port(), qa=always_abstains)) as url:
        with headless_chromium(url + "/", tmp_path / "profile") as page:
            page.type_into("#token", TOKEN)
            page.type_into("#document", record["context"])
            page.type_into("#question", record["question"])
            page.click("#ask")
            answered = ("!document.getElementById('result').hidden "
                        "|| document.getElementById('status').className == 'error'")
            wait_until(lambda: page.evaluate(answered), timeout_s=60, what="the answer to appear")
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
