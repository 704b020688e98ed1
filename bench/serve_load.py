"""Serving under concurrent HTTP load: dynamic batching on against off, same model, same requests.

    python -m bench.serve_load                 # CPU: pretrained MiniLM (6 layers), 1 replica on 1 CPU
    python -m bench.serve_load --gpu           # bert-base shape on one GPU, bfloat16, larger batches and load

Starts serve_app (its packaged config and its own CLI flags, on 127.0.0.1 and a free port) on a fresh
local Ray with ONE model replica, and for each mode sends ``--requests`` POST /v1/answer requests
(one question each, real SQuAD questions) from ``--concurrency`` concurrent clients (asyncio +
httpx), after ``--warmup`` untimed ones, within a hard ``--time-limit-s``:

- batched:   ``--max-batch-size`` questions per model call (serve_app's @serve.batch);
- unbatched: ``--max-batch-size 1``: one question per model call, one at a time;
- single:    one client, one question at a time (``--single-requests`` of them): the latency a lone
  user sees, with no queueing.

``--backend`` picks serve_app's inference backend (torch, onnx, onnx-int8, auto; the ONNX ones need
a model directory exported with ``python -m qa_common.export_onnx``).

Reports p50/p90/p99 latency, requests/s, windows/s (a long context makes several 384-token
windows), questions per model call, errors, and the batched/unbatched throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

from bench import benchlib, models
from serve_app.app import APP_NAME, MODEL_DEPLOYMENT
from bench.local_service import free_port, question_payloads, serve_app_config, serving, windows_per_payload
from qa_common.backends import BACKENDS
from qa_common.modeling import SERVING_DTYPES

DEFAULT_OUT = benchlib.RESULTS / "serve_load.json"
MODES = ("batched", "unbatched", "single")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="one GPU replica, bert-base shape, bigger batches and load")
    parser.add_argument("--model", help=f"{models.MODEL_HELP} (default: minilm on CPU, bert-base with --gpu)")
    parser.add_argument("--data", type=Path, default=None,
                        help="questions to ask (default: ../shared SQuAD sample dev article if present, "
                             "else train_job/quickstart_data/quickstart-validation.jsonl)")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per mode (default 200 CPU, 4000 GPU)")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 16 CPU, 128 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed requests first (default: the concurrency)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="batched mode's batch (default 16 CPU, 64 GPU)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=None,
                        help="how long a batch waits to fill (default: serve_app's config)")
    parser.add_argument("--forward-batch-size", type=int, default=None,
                        help="windows per forward pass (default: serve_app's, 64; 256 with --gpu)")
    parser.add_argument("--dtype", choices=SERVING_DTYPES, default=None,
                        help="the model's weights (serve_app's --dtype; default: its config, auto)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="serve_app's inference backend (default: its config, auto)")
    parser.add_argument("--single-requests", type=int, default=50,
                        help="timed requests of the single mode (default: %(default)s)")
    parser.add_argument("--replica-cpus", type=float, default=None, help="CPUs of the model replica (default 1)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--modes", default="batched,unbatched", help="which modes, in order (default: %(default)s)")
    parser.add_argument("--time-limit-s", type=float, default=300, help="hard limit per mode's timed load (default: %(default)s)")
    parser.add_argument("--request-timeout-s", type=float, default=120, help="per-request client timeout (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.model = args.model or ("bert-base" if args.gpu else "minilm")
    args.data = args.data or benchlib.default_eval_data()
    args.requests = args.requests or (4000 if args.gpu else 200)
    args.concurrency = args.concurrency or (128 if args.gpu else 16)
    args.warmup = args.concurrency if args.warmup is None else args.warmup
    args.max_batch_size = args.max_batch_size or (64 if args.gpu else 16)
    args.forward_batch_size = args.forward_batch_size or (256 if args.gpu else None)
    args.replica_cpus = args.replica_cpus or 1
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}")
    return args


async def send_load(base_url: str, payloads: list[dict], windows: list[int], *, concurrency: int,
                    time_limit_s: float, timeout_s: float) -> dict:
    """Send every payload once from ``concurrency`` clients; latencies of the answered ones, errors by kind."""
    import httpx

    latencies, errors = [], Counter()
    answered_windows = 0
    queue = list(range(len(payloads)))[::-1]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        async def client_loop():
            nonlocal answered_windows
            while queue:
                index = queue.pop()
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/answer", json=payloads[index])
                    elapsed = time.perf_counter() - started
                    if response.status_code == 200 and "answer" in response.json():
                        latencies.append(elapsed)
                        answered_windows += windows[index]
                    else:
                        errors[f"HTTP {response.status_code}"] += 1
                except (httpx.HTTPError, ValueError) as error:
                    errors[type(error).__name__] += 1

        clock = benchlib.Stopwatch()
        tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall_s = clock()
    unfinished = len(payloads) - len(latencies) - sum(errors.values())
    if unfinished:
        errors[f"unfinished after the {time_limit_s:g} s limit"] += unfinished
    return {"latencies": latencies, "errors": dict(errors), "wall_s": wall_s, "answered_windows": answered_windows}


def model_info() -> dict:
    """What the model replica runs (backend, dtype) and its model calls so far, asked through Serve."""
    from ray import serve

    return serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME).describe.remote().result()


def run_mode(mode: str, args, model_dir: str, port: int, payloads, windows) -> dict:
    batch = args.max_batch_size if mode == "batched" else 1
    concurrency = 1 if mode == "single" else args.concurrency
    config = serve_app_config(model_dir, port, max_batch_size=batch, replica_cpus=args.replica_cpus, gpu=args.gpu,
                              batch_wait_timeout_s=args.batch_wait_timeout_s,
                              forward_batch_size=args.forward_batch_size, dtype=args.dtype, backend=args.backend)
    clock = benchlib.Stopwatch()
    with serving(config) as base_url:
        deploy_s = clock()
        warm = payloads[: args.warmup]
        if warm:
            asyncio.run(send_load(base_url, warm, windows, concurrency=concurrency,
                                  time_limit_s=args.time_limit_s, timeout_s=args.request_timeout_s))
        served = model_info()
        load_before = benchlib.load_average()
        timed = payloads[args.warmup :][: args.single_requests if mode == "single" else None]
        result = asyncio.run(send_load(base_url, timed, windows[args.warmup :], concurrency=concurrency,
                                       time_limit_s=args.time_limit_s, timeout_s=args.request_timeout_s))
        calls = model_info()["model_calls"] - served["model_calls"]
    latencies = result["latencies"]
    answered = len(latencies)
    return {
        "mode": mode,
        "backend": served["backend"],
        "dtype": served["dtype"],
        "max_batch_size": batch,
        "requests": len(timed),
        "answered": answered,
        "errors": sum(result["errors"].values()),
        "error_kinds": result["errors"],
        "concurrency": concurrency,
        "wall_s": result["wall_s"],
        "requests_per_s": answered / result["wall_s"],
        "windows_per_s": result["answered_windows"] / result["wall_s"],
        "p50_ms": 1000 * benchlib.percentile(latencies, 50) if latencies else None,
        "p90_ms": 1000 * benchlib.percentile(latencies, 90) if latencies else None,
        "p99_ms": 1000 * benchlib.percentile(latencies, 99) if latencies else None,
        "mean_ms": 1000 * sum(latencies) / answered if latencies else None,
        "model_calls": calls,
        "questions_per_model_call": answered / calls if calls else None,
        "deploy_s": deploy_s,
        "load_average_before": load_before,
        "load_average": benchlib.load_average(),
    }


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-serve-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    payloads = question_payloads(args.data, args.warmup + args.requests)
    windows = windows_per_payload(payloads, model_dir)
    print(f"[bench] {args.requests} timed requests ({sum(windows[args.warmup:])} windows) from "
          f"{benchlib.data_label(args.data)}; model {models.model_summary(model_dir)}", flush=True)
    port = free_port()
    rows = []
    with benchlib.local_ray(args.cpus):
        for mode in args.modes:
            print(f"[bench] {mode}: {args.requests} requests, {args.concurrency} concurrent ...", flush=True)
            rows.append(run_mode(mode, args, model_dir, port, payloads, windows))

    by_mode = {row["mode"]: row for row in rows}
    ratios = {}
    if {"batched", "unbatched"} <= by_mode.keys():
        ratios["batched_vs_unbatched_requests_per_s"] = benchlib.ratio(
            by_mode["batched"]["requests_per_s"], by_mode["unbatched"]["requests_per_s"])
        ratios["batched_vs_unbatched_p50_latency"] = benchlib.ratio(by_mode["batched"]["p50_ms"], by_mode["unbatched"]["p50_ms"])
    for row in rows:
        ratios[f"{row['mode']}_windows_per_s"] = round(row["windows_per_s"], 1)
        ratios[f"{row['mode']}_p50_ms"] = round(row["p50_ms"], 1) if row["p50_ms"] else None
        ratios[f"{row['mode']}_errors"] = row["errors"]
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Serving under load (one model replica)", rows,
                         ["mode", "backend", "max_batch_size", "answered", "errors", "requests_per_s", "windows_per_s", "p50_ms",
                          "p90_ms", "p99_ms", "questions_per_model_call", "load_average"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(model_shape=models.model_summary(model_dir), timed_windows=sum(windows[args.warmup :]))
    settings.pop("out")
    benchlib.write_json(args.out, "serve_load", ratios, {"modes": rows}, settings, load_before)
    return 0 if all(row["answered"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
