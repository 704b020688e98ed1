"""The clinicians of ``bench.feedback_round``: who asks what, how a clinician who knows the gold answer
rates an answer, and end-to-end EM/F1 of what ``POST /v1/ask`` answered.

A rating is what the page sends: right when the first answer is a gold answer; else wrong, with the
gold words selected in the first shown passage that holds them (wrong without words when none does);
"the documents do not say" for a question asked of a document that does not hold its answer.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter

# New questions about the trained documents, and the held-out documents' questions.
GROUPS = ("trained_docs", "held_out_docs")


def split(records: list[dict], documents: dict[str, str], *, feedback_share: float, eval_questions: int | None,
          seed: int) -> dict[str, list[dict]]:
    """``{"feedback", GROUPS...}``: half the documents (drawn by ``seed``) are trained, and their questions
    cut into ``feedback_share`` sent as feedback and the rest asked afterwards; the held-out documents'
    questions; at most ``eval_questions`` per group. Each record gains its ``document``."""
    by_text = {text: name for name, text in documents.items()}
    names = sorted(documents)
    random.Random(seed).shuffle(names)
    trained = set(names[: len(names) // 2])
    groups = {"feedback": [], GROUPS[0]: [], GROUPS[1]: []}
    per_document: dict[str, list[dict]] = {}
    for record in records:
        per_document.setdefault(by_text[record["context"]], []).append({**record, "document": by_text[record["context"]]})
    rng = random.Random(seed + 1)
    for name in sorted(per_document):
        questions = per_document[name]
        if name not in trained:
            groups[GROUPS[1]] += questions
            continue
        rng.shuffle(questions)
        cut = round(feedback_share * len(questions))
        groups["feedback"] += questions[:cut]
        groups[GROUPS[0]] += questions[cut:]
    for name in GROUPS:
        rng.shuffle(groups[name])
        groups[name] = groups[name][:eval_questions]
    return groups


async def ask_all(url: str, token: str, bodies: list[dict], concurrency: int = 4) -> list[dict]:
    """``POST /v1/ask`` for every body, ``concurrency`` at a time: ``{"status", "json", "receipt"}`` each."""
    import httpx

    results: list[dict | None] = [None] * len(bodies)
    queue = list(enumerate(bodies))

    async def client():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {token}"}) as session:
            while queue:
                index, body = queue.pop()
                response = await session.post(f"{url}/v1/ask", json=body)
                results[index] = {"status": response.status_code, "json": response.json(),
                                  "receipt": response.headers.get("x-response-id")}

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


def score(records: list[dict], responses: list[dict]) -> dict:
    """End-to-end EM/F1 of the first answers (an abstention answers "")."""
    from qa_common.metric import score_answer

    scores = [score_answer(r["json"]["answers"][0]["answer"] if r["status"] == 200 else "", record["answers"]["text"])
              for record, r in zip(records, responses)]
    return {"questions": len(scores), "exact_match": 100 * sum(s["exact_match"] for s in scores) / max(1, len(scores)),
            "f1": 100 * sum(s["f1"] for s in scores) / max(1, len(scores)),
            "errors": sum(r["status"] != 200 for r in responses)}


def rating(record: dict, response: dict) -> dict:
    """What a clinician who knows the gold answer sends about ``response`` (a /v1/ask answer list)."""
    from qa_common.metric import score_answer

    answers = response["json"]["answers"]
    gold = record["answers"]["text"]
    if answers[0]["answer"] and score_answer(answers[0]["answer"], gold)["exact_match"]:
        return {"verdict": "right", "answer": 0}
    for index, answer in enumerate(answers):
        for text in gold:
            start = (answer["passage"] or "").find(text)
            if start >= 0:
                return {"verdict": "wrong", "answer": index, "correction": {"start": start, "end": start + len(text)}}
    return {"verdict": "wrong", "answer": 0}


def send_feedback(url: str, token: str, records: list[dict], documents: list[str], *, not_said_every: int,
                  seed: int) -> dict:
    """Ask every feedback question and rate its answer through ``POST /v1/feedback``; counts per verdict.
    One question in ``not_said_every`` is asked of another of ``documents`` only and marked "the
    documents do not say"."""
    import httpx

    rng = random.Random(seed + 2)
    bodies = []
    for index, record in enumerate(records):
        if index % not_said_every == not_said_every - 1:  # asked of another document only
            other = rng.choice([name for name in documents if name != record["document"]])
            bodies.append({"question": record["question"], "document": other, "top_k": 1})
        else:
            bodies.append({"question": record["question"], "top_k": 3})
    responses = asyncio.run(ask_all(url, token, bodies))
    counts: Counter = Counter()
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
        for record, body, response in zip(records, bodies, responses):
            if response["status"] != 200:
                counts["ask_error"] += 1
                continue
            rated = {"verdict": "not_in_documents", "answer": 0} if "document" in body else rating(record, response)
            sent = client.post(f"{url}/v1/feedback", json={"response_id": response["receipt"],
                                                         "question": record["question"], "key": uuid.uuid4().hex, **rated})
            kind = rated["verdict"] + (" with words" if "correction" in rated else "")
            counts[kind if sent.status_code == 201 else f"HTTP {sent.status_code}"] += 1
    return dict(counts)
