"""Soak: many clients for a fixed time, some long documents, and the model replica killed midway.

    python -m bench.serve_soak                       # 100 clients x 60 s, MiniLM, on 127.0.0.1 only

Starts serve_app (packaged config, its own CLI flags, one model replica, an API token) on a fresh
local Ray and runs ``--clients`` concurrent clients (asyncio + httpx) for ``--duration-s``: each
sends POST /v1/answer with a real SQuAD question; one request in ``--long-every`` carries a long
document (``--long-chars`` characters of the article's paragraphs). At ``--kill-at-s`` the model
replica's actor is killed (``ray.kill``); Serve starts another and the ingress retries the
questions that were on it.

Reports requests, status counts, p50/p95/p99 of the answered (200) requests, throughput, 503s (and
whether each carried Retry-After), and answers whose offsets do not match the context. Targets:
nothing outside 200/503, Retry-After on every 503, p99 of the answered within the deadline, no
offset mismatches, and the killed replica replaced (one RUNNING within ``--replaced-within-s`` of the
load's end). Bounded in time: the load stops at ``--duration-s``, and requests still open
``--drain-s`` later are counted as unfinished.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

from bench import benchlib, models
from serve_app.app import APP_NAME, MODEL_DEPLOYMENT
from bench.local_service import free_port, replica_counts, serve_app_config, serving, wait_until

DEFAULT_OUT = benchlib.RESULTS / "serve_soak.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help=f"{models.MODEL_HELP} (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None, help="SQuAD-format questions (default: the SQuAD sample "
                        "dev article if present, else train_job/data/quickstart-validation.jsonl)")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=60, help="how long the clients send (default: %(default)s)")
    parser.add_argument("--long-every", type=int, default=10, help="one request in N has a long document (default: %(default)s)")
    parser.add_argument("--long-chars", type=int, default=30_000, help="characters of a long document (default: %(default)s)")
    parser.add_argument("--kill-at-s", type=float, default=None, help="kill the model replica then (default: halfway; <0: never)")
    parser.add_argument("--deadline-s", type=float, default=None, help="serve_app's request deadline (default: its config's)")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs of the model replica (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--drain-s", type=float, default=None, help="wait this long for open requests after the load "
                        "(default: the deadline + 10)")
    parser.add_argument("--replaced-within-s", type=float, default=120, help="after the load, wait this long for "
                        "the killed replica's replacement to be RUNNING (default: %(default)s)")
    parser.add_argument("--ignore-retry-after", dest="honour_retry_after", action="store_false",
                        help="send the next request at once after a 503 (default: wait Retry-After, as a good client does)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.data = args.data or benchlib.default_eval_data()
    args.kill_at_s = args.duration_s / 2 if args.kill_at_s is None else args.kill_at_s
    return args


def payloads(path: Path, long_chars: int) -> tuple[list[dict], list[dict]]:
    """Short requests (a question and its paragraph) and long ones (the question in ~long_chars of the article)."""
    from qa_common import read_squad

    records = read_squad(path, require_answers=False)
    paragraphs = list(dict.fromkeys(r["context"] for r in records))
    short = [{"question": r["question"], "context": r["context"]} for r in records]
    long = []
    for record in records[:50]:
        others = [p for p in paragraphs if p != record["context"]]
        document, rng = [], random.Random(len(long))
        while sum(len(p) + 2 for p in document) < long_chars - len(record["context"]):
            document.append(rng.choice(others))
        document.insert(rng.randrange(len(document) + 1), record["context"])
        long.append({"question": record["question"], "context": "\n\n".join(document)[: max(long_chars, 1)]})
    return short, long


def kill_model_replica() -> str:
    import ray

    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{MODEL_DEPLOYMENT}#")]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    return replica["name"]


async def soak(base_url: str, token: str, short: list[dict], long: list[dict], args, deadline_s: float) -> dict:
    import httpx

    records, events = [], {}
    stop_at = time.monotonic() + args.duration_s
    started = time.monotonic()
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    headers = {"Authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(base_url=base_url, timeout=deadline_s + 60, limits=limits, headers=headers) as client:
        async def client_loop(seed: int):
            rng = random.Random(seed)
            count = 0
            while time.monotonic() < stop_at:
                count += 1
                is_long = (count + seed) % args.long_every == 0
                body = rng.choice(long if is_long else short)
                sent = time.monotonic()
                record = {"sent_s": sent - started, "long": is_long}
                try:
                    response = await client.post("/v1/answer", json=body)
                    record.update(status=response.status_code, latency_s=time.monotonic() - sent,
                                  retry_after="retry-after" in response.headers)
                    if response.status_code == 200:
                        answer = response.json()
                        record["offsets_match"] = body["context"][answer["start"]:answer["end"]] == answer["answer"]
                    elif response.status_code == 503 and args.honour_retry_after:
                        records.append(record)
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                        continue
                except (httpx.HTTPError, ValueError) as error:
                    record.update(status=type(error).__name__, latency_s=time.monotonic() - sent)
                records.append(record)

        async def killer():
            if args.kill_at_s < 0:
                return
            await asyncio.sleep(args.kill_at_s)
            events["killed_at_s"] = time.monotonic() - started
            events["killed_replica"] = await asyncio.to_thread(kill_model_replica)

        tasks = [asyncio.create_task(client_loop(seed)) for seed in range(args.clients)]
        kill_task = asyncio.create_task(killer())
        drain_s = deadline_s + 10 if args.drain_s is None else args.drain_s
        _, pending = await asyncio.wait(tasks, timeout=args.duration_s + drain_s)
        for task in [*pending, kill_task]:
            task.cancel()
        await asyncio.gather(*pending, kill_task, return_exceptions=True)
        events["unfinished"] = len(pending)
        events["wall_s"] = time.monotonic() - started
    return {"records": records, **events}


def wait_for_one_running_replica(timeout_s: float) -> tuple[dict[str, int], float]:
    """The model's replica states once one replica is RUNNING again (a replacement loads the model, which takes
    tens of seconds on a loaded machine), or as they are after ``timeout_s``; and the seconds it took."""
    started = time.monotonic()
    try:
        wait_until(lambda: replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {"RUNNING": 1}, timeout_s=timeout_s,
                   what="the model's replica to be RUNNING", interval_s=0.5)
    except TimeoutError:
        pass
    return replica_counts(APP_NAME, MODEL_DEPLOYMENT), round(time.monotonic() - started, 1)


def summarise(result: dict, deadline_s: float) -> dict:
    records = result["records"]
    statuses = Counter(str(r["status"]) for r in records)
    answered = [r["latency_s"] for r in records if r["status"] == 200]
    rejected = [r for r in records if r["status"] == 503]
    killed_at = result.get("killed_at_s")
    after_kill = [r for r in records if killed_at is not None and r["sent_s"] >= killed_at and r["status"] == 200]
    p = {q: (1000 * benchlib.percentile(answered, q) if answered else None) for q in (50, 95, 99)}
    return {
        "requests": len(records),
        "statuses": dict(statuses),
        "answered": len(answered),
        "answered_long": sum(1 for r in records if r["status"] == 200 and r["long"]),
        "rejected_503": len(rejected),
        "rejected_503_without_retry_after": sum(1 for r in rejected if not r["retry_after"]),
        "outside_200_503": sum(count for status, count in statuses.items() if status not in ("200", "503"))
        + result["unfinished"],
        "unfinished": result["unfinished"],
        "offset_mismatches": sum(1 for r in records if r.get("offsets_match") is False),
        "p50_ms": p[50], "p95_ms": p[95], "p99_ms": p[99],
        "p99_within_deadline": p[99] is not None and p[99] <= 1000 * deadline_s,
        "answered_per_s": len(answered) / result["wall_s"],
        "wall_s": result["wall_s"],
        "killed_at_s": killed_at,
        "first_answer_sent_after_kill_s": (min(r["sent_s"] for r in after_kill) - killed_at) if after_kill else None,
    }


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-soak-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    from serve_app.auth import hash_token

    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    short, long = payloads(args.data, args.long_chars)
    token = "soak-" + os.urandom(16).hex()
    hashes = workdir / "token-hashes.txt"
    hashes.write_text(hash_token(token) + "\n", encoding="utf-8")
    config = serve_app_config(model_dir, free_port(), max_batch_size=8, replica_cpus=args.replica_cpus,
                              request_deadline_s=args.deadline_s)
    [app] = config["applications"]
    app["args"]["token_hashes_file"] = str(hashes)
    deadline_s = app["args"].get("request_deadline_s", 30)
    print(f"[bench] {args.clients} clients x {args.duration_s:g} s, 1 in {args.long_every} with {args.long_chars:,} "
          f"characters, replica killed at {args.kill_at_s:g} s; model {models.model_summary(model_dir)}", flush=True)
    with benchlib.local_ray(args.cpus):
        with serving(config) as base_url:
            result = asyncio.run(soak(base_url, token, short, long, args, deadline_s))
            replicas_after, waited_s = wait_for_one_running_replica(args.replaced_within_s)

    summary = {**summarise(result, deadline_s), "replicas_after": replicas_after,
               "replica_running_s_after_load": waited_s}
    benchlib.print_table("Soak", [summary], ["requests", "answered", "rejected_503", "outside_200_503", "p50_ms",
                                             "p95_ms", "p99_ms", "answered_per_s", "offset_mismatches"])
    print(f"statuses {summary['statuses']}; 503 without Retry-After: {summary['rejected_503_without_retry_after']}; "
          f"p99 within the {deadline_s:g} s deadline: {summary['p99_within_deadline']}; replica killed at "
          f"{summary['killed_at_s']}; replicas after: {replicas_after}, {waited_s:.1f} s after the load")
    targets = {
        "outside_200_503": summary["outside_200_503"],
        "rejected_503_without_retry_after": summary["rejected_503_without_retry_after"],
        "offset_mismatches": summary["offset_mismatches"],
        "p99_within_deadline": summary["p99_within_deadline"],
        "replica_replaced": replicas_after == {"RUNNING": 1},
    }
    benchlib.print_table("Ratios (targets: 0, 0, 0, True, True)",
                         [{"ratio": k, "value": v} for k, v in targets.items()], ["ratio", "value"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(model_shape=models.model_summary(model_dir), deadline_s=deadline_s)
    settings.pop("out")
    benchlib.write_json(args.out, "serve_soak", targets, {"soak": summary}, settings, load_before)
    met = (summary["outside_200_503"] == 0 and summary["rejected_503_without_retry_after"] == 0
           and summary["offset_mismatches"] == 0 and summary["p99_within_deadline"] and targets["replica_replaced"])
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
