"""Cold start: from zero model replicas to the first answer, with a local model directory.

    python -m bench.cold_start                 # CPU: pretrained MiniLM saved to a local directory
    python -m bench.cold_start --gpu           # bert-base shape on one GPU

Starts serve_app (packaged config, its own CLI flags, 127.0.0.1, a free port) on a fresh local Ray
with ``min_replicas 0`` and short downscale delays, waits until the model deployment has 0
replicas, sends one POST /v1/answer and times it until the answer arrives (the replica is started,
loads the model and answers). ``--repeats`` times. Also reports the next (warm) request's latency and
how long the idle model took to reach zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import benchlib, models
from serve_app.app import APP_NAME, MODEL_DEPLOYMENT
from bench.local_service import free_port, replica_counts, serve_app_config, serving, wait_until
from qa_common.backends import BACKENDS
from qa_common.modeling import SERVING_DTYPES

DEFAULT_OUT = benchlib.RESULTS / "cold_start.json"
QUESTION = {"question": "Which drug was stopped?", "context": "Warfarin was stopped on admission because of bleeding."}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the replica on one GPU, bert-base shape")
    parser.add_argument("--model", help=f"{models.MODEL_HELP} (default: minilm on CPU, bert-base with --gpu)")
    parser.add_argument("--repeats", type=int, default=2, help="cold starts to time (default: %(default)s)")
    parser.add_argument("--downscale-to-zero-delay-s", type=float, default=2.0,
                        help="idle seconds before the last replica stops (default: %(default)s)")
    parser.add_argument("--dtype", choices=SERVING_DTYPES, default=None,
                        help="the model's weights (serve_app's --dtype; default: its config, auto)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="serve_app's inference backend (default: its config, auto)")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs of the model replica (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--zero-timeout-s", type=float, default=120, help="longest wait for 0 replicas (default: %(default)s)")
    parser.add_argument("--request-timeout-s", type=float, default=180, help="client timeout of the cold request, and the service's request deadline (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.model = args.model or ("bert-base" if args.gpu else "minilm")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def timed_post(url: str, timeout_s: float) -> tuple[float, dict]:
    import httpx

    clock = benchlib.Stopwatch()
    response = httpx.post(f"{url}/v1/answer", json=QUESTION, timeout=timeout_s)
    elapsed = clock()
    if response.status_code != 200:
        raise SystemExit(f"the request got HTTP {response.status_code}: {response.text[:500]}")
    answer = response.json()
    if QUESTION["context"][answer["start"] : answer["end"]] != answer["answer"]:
        raise SystemExit(f"a malformed answer: {answer}")
    return elapsed, answer


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-cold-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    model_dir = models.prepare_model_dir(args.model, workdir / "model")
    autoscaling = {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 1, "upscale_delay_s": 0,
                   "downscale_delay_s": 1, "downscale_to_zero_delay_s": args.downscale_to_zero_delay_s,
                   "look_back_period_s": 2}  # else a request keeps the replica up for Serve's default 30 s
    config = serve_app_config(model_dir, free_port(), max_batch_size=8, replica_cpus=args.replica_cpus,
                              gpu=args.gpu, min_replicas=0, max_replicas=1, autoscaling=autoscaling,
                              dtype=args.dtype, backend=args.backend,
                              # a start slower than the service's deadline would read as a 503
                              request_deadline_s=args.request_timeout_s)
    rows = []
    with benchlib.local_ray(args.cpus):
        clock = benchlib.Stopwatch()
        with serving(config) as url:
            deploy_s = clock()
            print(f"[bench] deployed in {deploy_s:.1f} s (one warm replica first, to check the model loads)", flush=True)
            for repeat in range(1, args.repeats + 1):
                clock = benchlib.Stopwatch()
                wait_until(lambda: replica_counts(APP_NAME, MODEL_DEPLOYMENT) == {}, timeout_s=args.zero_timeout_s,
                           what="the idle model deployment to reach 0 replicas")
                to_zero_s = clock()
                time.sleep(1.0)  # settled at zero
                load = benchlib.load_average()
                print(f"[bench] cold start {repeat}: 0 replicas after {to_zero_s:.1f} s idle; asking ...", flush=True)
                cold_s, answer = timed_post(url, args.request_timeout_s)
                warm_s, _ = timed_post(url, args.request_timeout_s)
                rows.append({"repeat": repeat, "time_to_first_answer_s": cold_s, "next_request_s": warm_s,
                             "idle_to_zero_s": to_zero_s, "answer": answer["answer"], "load_average": load})

    cold = [row["time_to_first_answer_s"] for row in rows]
    ratios = {"cold_start_median_s": round(benchlib.median(cold), 2), "cold_start_max_s": round(max(cold), 2),
              "cold_vs_warm_request": benchlib.ratio(benchlib.median(cold), benchlib.median([r["next_request_s"] for r in rows]))}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("Cold start: 0 replicas -> first answer", rows,
                         ["repeat", "time_to_first_answer_s", "next_request_s", "idle_to_zero_s", "load_average"])
    settings = {key: (benchlib.data_label(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    settings.update(model_shape=models.model_summary(model_dir), deploy_s=deploy_s, autoscaling=autoscaling)
    settings.pop("out")
    benchlib.write_json(args.out, "cold_start", ratios, {"cold_starts": rows}, settings, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
