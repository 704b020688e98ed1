"""``POST /v1/ask`` latency: the retriever's cold start from zero, then p50/p95 at 1 and 8 clients.

    python -m bench.ask_latency --model runs/squad-minilm/model --library runs/ask-dev/library/index

Serves the model (``--backend``, default onnx-int8: ``python -m qa_common.export_onnx`` writes it)
and the library index on a fresh local Ray with the packaged config: one model replica and one
retriever replica of one CPU each (the reader's intra-op threads: ``--reader-threads``, by default
what ``python -m serve_app --library`` gives it on one machine), the retriever starting at zero
replicas, so that the first question measures its cold start (replica start, index open, embedder
load). Then each ``--concurrency`` level sends ``--requests`` questions of ``--data``, each reading
``--passages`` passages (default: the service's ``passages``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench import benchlib, models
from bench.local_service import free_port, replica_counts, serve_app_config
from serve_app.app import APP_NAME
from serve_app.retriever import RETRIEVER_DEPLOYMENT



def ask_body(question: str, passages: int | None) -> dict:
    return {"question": question} | ({"passages": passages} if passages else {})


async def send(url: str, questions: list[str], concurrency: int, timeout_s: float, passages: int | None = None) -> dict:
    import httpx

    latencies, errors, queue = [], 0, list(questions)[::-1]
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        async def loop():
            nonlocal errors
            while queue:
                question = queue.pop()
                started = time.perf_counter()
                response = await client.post("/v1/ask", json=ask_body(question, passages))
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
        clock = benchlib.Stopwatch()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = clock()
    return {"concurrency": concurrency, "requests": len(questions), "errors": errors,
            "p50_ms": round(1000 * benchlib.percentile(latencies, 50), 1),
            "p95_ms": round(1000 * benchlib.percentile(latencies, 95), 1),
            "questions_per_s": round(len(latencies) / wall, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ask_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="reader model directory")
    parser.add_argument("--library", type=Path, required=True, help="a library (python -m library_job build)")
    parser.add_argument("--data", type=Path, default=benchlib.SQUAD_FULL_DEV, help="SQuAD-format file of questions")
    parser.add_argument("--backend", default="onnx-int8", help="serve_app's --backend (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=80, help="questions per concurrency level")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client counts (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=None, help="passages read per question (default: the service's)")
    parser.add_argument("--reader-threads", type=int, default=None,
                        help="the model replica's intra-op threads (serve_app's --reader-threads; default: as "
                             "python -m serve_app --library sets them on one machine)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "ask_latency.json")
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()

    import httpx

    from qa_common import read_squad
    from serve_app.app import run_config

    questions = [r["question"] for r in read_squad(args.data)][:: 7][: args.requests * 2]
    config = serve_app_config(args.model, free_port(), max_batch_size=8, replica_cpus=1,
                              backend=args.backend, reader_threads=args.reader_threads, library=args.library)
    [app] = config["applications"]
    app["deployments"].append({"name": RETRIEVER_DEPLOYMENT, "ray_actor_options": {"num_cpus": 1},
                               "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                                      "downscale_to_zero_delay_s": 3600}})
    with benchlib.local_ray(2):
        url = run_config(config).rstrip("/")
        assert replica_counts(APP_NAME, RETRIEVER_DEPLOYMENT).get("RUNNING", 0) == 0
        clock = benchlib.Stopwatch()
        first = httpx.post(f"{url}/v1/ask", json=ask_body(questions[0], args.passages), timeout=300)
        cold_s = clock()
        first.raise_for_status()
        clock = benchlib.Stopwatch()
        httpx.post(f"{url}/v1/ask", json=ask_body(questions[1], args.passages), timeout=60).raise_for_status()
        warm_s = clock()
        print(f"[bench] retriever cold start: first answer {cold_s:.2f} s, next {warm_s:.2f} s", flush=True)
        levels = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            levels.append(asyncio.run(send(url, questions[: args.requests], concurrency, timeout_s=120,
                                           passages=args.passages)))
            print(levels[-1], flush=True)
        card = httpx.get(f"{url}/v1/model", timeout=30).json()
    ratios = {"p50_ms_1_client": levels[0]["p50_ms"], "retriever_cold_start_s": round(cold_s, 2)}
    benchlib.write_json(args.out, "ask_latency", ratios,
                        {"cold_first_answer_s": round(cold_s, 2), "next_answer_s": round(warm_s, 2), "levels": levels},
                        {"model": models.model_summary(args.model), "backend": card["backend"],
                         "reader_threads": card["threads"],
                         "passages": args.passages or card["passages"],
                         "data": benchlib.data_label(args.data), "requests": args.requests}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
