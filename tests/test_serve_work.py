"""How a model replica cuts its batches and contains failures (serve_app.work); no Ray needed."""

import asyncio

import pytest

from qa_common import Question
from serve_app.work import DEADLINE, FAILED, WorkItem, answer_in_chunks, plan_chunks


@pytest.mark.parametrize("windows, budget, chunks", [
    ([1, 1, 1], 2, [[0, 1], [2]]),
    ([3, 3, 3], 6, [[0, 1], [2]]),
    ([10, 1, 1], 4, [[0], [1, 2]]),   # one item over the budget runs alone
    ([1, 10, 1], 4, [[0], [1], [2]]),
    ([], 4, []),
])
def test_plan_chunks_keeps_order_and_budget(windows, budget, chunks):
    assert plan_chunks(windows, budget) == chunks


def _item(text: str, windows: int = 1, deadline: float = 100.0) -> WorkItem:
    return WorkItem(Question(text, "some context"), windows, deadline)


def test_each_chunk_is_one_call_within_the_budget():
    calls = []

    async def answer_chunk(items):
        calls.append([item.question.question for item in items])
        return [{"answers": [{"answer": item.question.question}]} for item in items]

    items = [_item("a", 2), _item("b", 2), _item("c", 3), _item("d", 1)]
    outcomes = asyncio.run(answer_in_chunks(items, 4, answer_chunk, now=lambda: 0.0))
    assert calls == [["a", "b"], ["c", "d"]]
    assert [o["answers"][0]["answer"] for o in outcomes] == ["a", "b", "c", "d"]


def test_a_failing_question_gets_its_own_error_and_the_others_are_answered():
    async def answer_chunk(items):
        if any(item.question.question == "bad" for item in items):
            raise ValueError("text of the question that must not leak")
        return [{"answers": [{"answer": item.question.question}]} for item in items]

    items = [_item("a"), _item("bad"), _item("c")]
    outcomes = asyncio.run(answer_in_chunks(items, 10, answer_chunk, now=lambda: 0.0))
    assert outcomes[0] == {"answers": [{"answer": "a"}]} and outcomes[2] == {"answers": [{"answer": "c"}]}
    assert outcomes[1] == {"error": FAILED, "type": "ValueError"}  # the class, never the message


def test_the_deadline_is_checked_between_chunks():
    clock = {"now": 0.0}
    calls = []

    async def answer_chunk(items):
        calls.append(len(items))
        clock["now"] += 10  # each model call takes 10 s
        return [{"answers": [{"answer": "x"}]} for _ in items]

    items = [_item("a", 1, deadline=5), _item("b", 1, deadline=5), _item("c", 1, deadline=50)]
    outcomes = asyncio.run(answer_in_chunks(items, 1, answer_chunk, now=lambda: clock["now"]))
    # "a" runs; by then "b" is past its deadline and is dropped without a model call; "c" runs.
    assert calls == [1, 1]
    assert [next(iter(o)) for o in outcomes] == ["answers", "error", "answers"]
    assert outcomes[1] == {"error": DEADLINE}
