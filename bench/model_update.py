"""Updating the served model under load: python -m serve_app update, and its rollback, against no update.

    python -m bench.model_update --model-a runs/squad-minilm/model --model-b runs/learning-curve/8000/model

Starts serve_app (packaged config, an API token, one model replica of ``--replica-cpus``) serving
model A on a fresh local Ray, and runs three phases of ``--clients`` concurrent clients (asyncio +
httpx, real SQuAD questions) for ``--duration-s`` each:

- ``steady``: no update, the reference latency;
- ``update``: halfway through, ``python -m serve_app update --model B`` (the real command, in its
  own process, as an operator runs it);
- ``rollback``: halfway through, ``python -m serve_app update --rollback``.

Per phase: status counts (target: every response 200), the model versions that answered
(``X-Model-Version``), p50/p99 latency overall and of the requests sent while the command ran,
the command's wall time, and when the old model answered last (measured from the command's start).
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
from bench.local_service import free_port, question_payloads, serve_app_config

DEFAULT_OUT = benchlib.RESULTS / "model_update.json"
PHASES = ("steady", "update", "rollback")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.model_update", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-a", default="minilm", help=f"the model served first: {models.MODEL_HELP}")
    parser.add_argument("--model-b", default="minilm", help="the model updated to (same choices; minilm: "
                        "the packaged MiniLM with another fresh QA head)")
    parser.add_argument("--data", type=Path, default=None, help="SQuAD-format questions (default: the SQuAD sample "
                        "dev article if present, else the quickstart validation set)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--duration-s", type=float, default=60, help="seconds of load per phase (default: %(default)s)")
    parser.add_argument("--replica-cpus", type=float, default=1, help="CPUs of the model replica (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: %(default)s)")
    parser.add_argument("--backend", default=None, help="serve_app's backend (default: its config's, auto)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    args = parser.parse_args(argv)
    args.data = args.data or benchlib.default_eval_data()
    return args


async def phase(base_url: str, token: str, payloads: list[dict], args, command: list[str] | None) -> dict:
    """``--clients`` clients for ``--duration-s``, and on until 5 s after ``command`` (run halfway) returned."""
    import httpx

    records, events = [], {}
    started = time.monotonic()
    stop_at = started + args.duration_s
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        def go_on() -> bool:
            now, done = time.monotonic(), events.get("command_done_s")
            if now < stop_at:
                return True
            return command is not None and (done is None or now < started + done + 5)

        async def client_loop(seed: int):
            count = seed
            while go_on():
                body = payloads[count % len(payloads)]
                count += args.clients
                sent = time.monotonic()
                try:
                    response = await client.post("/v1/answer", json=body)
                    status, version = response.status_code, response.headers.get("x-model-version")
                except httpx.HTTPError as error:
                    status, version = type(error).__name__, None
                records.append({"sent_s": sent - started, "done_s": time.monotonic() - started,
                                "status": status, "version": version})

        async def operator():
            if command is None:
                return
            await asyncio.sleep(args.duration_s / 2)
            events["command_started_s"] = time.monotonic() - started
            process = await asyncio.create_subprocess_exec(*command)
            events["command_rc"] = await process.wait()
            events["command_done_s"] = time.monotonic() - started

        await asyncio.gather(operator(), *(client_loop(seed) for seed in range(args.clients)))
    return {"records": records, **events}


def summarise(result: dict, old: str | None, new: str | None) -> dict:
    records = result["records"]
    latency = [r["done_s"] - r["sent_s"] for r in records if r["status"] == 200]
    summary = {
        "requests": len(records),
        "statuses": dict(Counter(str(r["status"]) for r in records)),
        "versions": dict(Counter(str(r["version"]) for r in records)),
        "p50_ms": 1000 * benchlib.percentile(latency, 50), "p99_ms": 1000 * benchlib.percentile(latency, 99),
        "answered_per_s": len(latency) / max(r["done_s"] for r in records),
    }
    if "command_started_s" in result:
        begin, end = result["command_started_s"], result["command_done_s"]
        during = [r["done_s"] - r["sent_s"] for r in records if begin <= r["sent_s"] <= end and r["status"] == 200]
        old_done = [r["done_s"] for r in records if r["version"] == old]
        summary.update({
            "command_rc": result["command_rc"], "command_s": end - begin,
            "old_model_last_answered_s": (max(old_done) - begin) if old_done else None,
            "old_model_answers_sent_after_command": sum(1 for r in records if r["version"] == old and r["sent_s"] > end),
            "during_command_p50_ms": 1000 * benchlib.percentile(during, 50) if during else None,
            "during_command_p99_ms": 1000 * benchlib.percentile(during, 99) if during else None,
            "old_version": old, "new_version": new,
        })
    return summary


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-update-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    import httpx
    import ray

    from serve_app.app import run_config
    from serve_app.auth import hash_token

    model_a = models.prepare_model_dir(args.model_a, workdir / "a" / "model", seed=0)
    model_b = models.prepare_model_dir(args.model_b, workdir / "b" / "model", seed=1)
    payloads = question_payloads(args.data, 512)
    token = "update-" + os.urandom(16).hex()
    hashes = workdir / "token-hashes.txt"
    hashes.write_text(hash_token(token) + "\n", encoding="utf-8")
    config = serve_app_config(model_a, free_port(), max_batch_size=8, replica_cpus=args.replica_cpus,
                              backend=args.backend)
    config["applications"][0]["args"]["token_hashes_file"] = str(hashes)
    results = {}
    with benchlib.local_ray(args.cpus):
        base_url = run_config(config).rstrip("/")
        update = [sys.executable, "-m", "serve_app", "update", "--address", ray.get_runtime_context().gcs_address]

        def version() -> str:
            return httpx.get(f"{base_url}/v1/model", headers={"Authorization": f"Bearer {token}"}).json()["version"]

        for name, command in zip(PHASES, (None, [*update, "--model", model_b], [*update, "--rollback"])):
            before = version()
            print(f"[bench] {name}: {args.clients} clients x {args.duration_s:g} s", flush=True)
            result = asyncio.run(phase(base_url, token, payloads, args, command))
            results[name] = summarise(result, before, version() if command else None)
            benchlib.print_table(name, [results[name]], [k for k in results[name] if k not in ("statuses", "versions")])
            print(f"  statuses {results[name]['statuses']}, versions {results[name]['versions']}", flush=True)
    steady = results["steady"]
    ratios = {f"{name}_during_command_p99_vs_steady_p99": benchlib.ratio(results[name].get("during_command_p99_ms"),
                                                                          steady["p99_ms"]) for name in PHASES[1:]}
    benchlib.write_json(args.out, "model_update", ratios, results,
                        {"clients": args.clients, "duration_s": args.duration_s, "replica_cpus": args.replica_cpus,
                         "cpus": args.cpus, "model_a": models.model_summary(model_a),
                         "model_b": models.model_summary(model_b), "data": benchlib.data_label(args.data)},
                        load_before)
    ok = all(set(results[name]["statuses"]) == {"200"} for name in PHASES)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
