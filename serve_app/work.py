"""How a model replica bounds its work: batches cut by a window budget, a deadline checked between cuts.

Pure asyncio and no Ray, so that it is testable on its own. A *work item* is one question with the
number of windows its context makes (the ingress counts them) and the time after which nobody
waits for its answer. Each outcome is what the model made of it (``{"answers": [...], ...}``,
``qa_common.read_questions``) or ``{"error": KIND}`` with
``KIND`` one of :data:`DEADLINE` and :data:`FAILED` (then ``"type"``: the exception's class name,
never its message, which may quote the input).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from qa_common import Question

DEADLINE = "deadline"
FAILED = "failed"


@dataclass(frozen=True)
class WorkItem:
    question: Question
    windows: int
    deadline: float  # time.time() after which the answer is no use to anyone


def plan_chunks(windows: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose windows add up to at most ``budget``.

    An item over the budget on its own gets a group of its own (the ingress bounds how big that is).
    """
    chunks, current, used = [], [], 0
    for index, count in enumerate(windows):
        if current and used + count > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(index)
        used += count
    if current:
        chunks.append(current)
    return chunks


async def answer_in_chunks(
    items: Sequence[WorkItem],
    budget: int,
    answer_chunk: Callable[[list[WorkItem]], Awaitable[list[dict]]],
    *,
    now: Callable[[], float] = time.time,
) -> list[dict]:
    """One outcome per item: ``answer_chunk`` reads chunks of items of at most ``budget`` windows
    (an outcome per item of the chunk).

    Before each chunk, items past their deadline are dropped (outcome ``DEADLINE``). When a chunk
    fails, each of its items runs alone, so that one bad question fails only itself.
    """
    outcomes: list[dict | None] = [None] * len(items)

    async def run(indices: list[int]) -> None:
        live = []
        for index in indices:
            if now() >= items[index].deadline:
                outcomes[index] = {"error": DEADLINE}
            else:
                live.append(index)
        if not live:
            return
        try:
            read = await answer_chunk([items[index] for index in live])
        except Exception as error:  # noqa: BLE001 - any failure of the model call is contained here
            if len(live) == 1:
                outcomes[live[0]] = {"error": FAILED, "type": type(error).__name__}
                return
            for index in live:
                await run([index])
            return
        for index, outcome in zip(live, read):
            outcomes[index] = outcome

    for chunk in plan_chunks([item.windows for item in items], budget):
        await run(chunk)
    return outcomes
