"""The bench scripts run end to end with a tiny model and tiny settings, and write valid JSON.

The scripts run in this process, on the session's Ray (``main`` as ``python -m bench.<script>`` calls
it; a script uses a Ray it finds running and leaves it so); the serving ones are in
``test_bench_services.py``. The figures themselves are not checked,
only that they are there.
"""

import importlib
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
from bench_helpers import REPO, run_bench

from conftest import FIXTURES
from train_job.allocator import tcmalloc_library

SMALL_WINDOWS = ["--max-length", "48", "--stride", "16", "--max-question-length", "20"]


TRAIN_FLAGS = ["--data", str(FIXTURES / "tiny-squad.jsonl"), "--eval-data", str(FIXTURES / "tiny-squad.json"),
               *SMALL_WINDOWS, "--batch-size", "4", "--epochs", "1", "--eval-questions", "2", "--cpus", "1"]


def test_train_throughput(local_ray, tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("accelerate", reason="the seed recipe's HF Trainer needs accelerate (the dev extra)")
    document = run_bench("train_throughput", tmp_path / "train.json", capsys, "--model", str(tiny_model_dir), *TRAIN_FLAGS,
                         "--seed-steps", "2", "--warmup-steps", "1")
    results, ratios = document["results"], document["ratios"]
    assert results["seed"]["features_per_s"] > 0 and results["ours"]["features_per_s"] > 0
    assert ratios["ours_vs_seed_features_per_s"] > 0


def test_train_scaling_and_variants(local_ray, tiny_model_dir, tmp_path, capsys):
    document = run_bench("train_scaling", tmp_path / "scaling.json", capsys, "--model", str(tiny_model_dir), *TRAIN_FLAGS)
    assert [row["workers"] for row in document["results"]["scaling"]] == [1, 2]
    assert document["ratios"]["scaling_efficiency_2_workers"] > 0
    document = run_bench("train_variants", tmp_path / "variants.json", capsys, "--model", str(tiny_model_dir), *TRAIN_FLAGS,
                         "--variant-features", "8")
    variants = document["results"]["variants"]
    assert len(variants) >= 5 and all(row["features_per_s"] > 0 for row in variants)


def test_dropout_seeds(tiny_model_dir, tmp_path, capsys):
    document = run_bench("dropout_seeds", tmp_path / "seeds.json", capsys, "--model", str(tiny_model_dir),
                         "--data", str(FIXTURES / "tiny-squad.jsonl"), "--questions", "20", "--steps", "8",
                         "--seeds", "run,5", "--threads", "1")
    runs = document["results"]["runs"]
    assert [(run["kind"], run["seed"]) for run in runs] == [("torch", "run"), ("cheap", "run"), ("torch", "5"), ("cheap", "5")]
    assert all(len(run["losses"]) == 8 and len(run["loss_per_eighth"]) == 8 for run in runs)
    assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0], rel=0.05)  # the same model and first batch
    assert runs[0]["losses"] != runs[2]["losses"]  # another seed draws other masks
    assert document["ratios"]["cheap_minus_torch_loss_last_eighth"] == pytest.approx(
        document["ratios"]["cheap_loss_last_eighth_mean"] - document["ratios"]["torch_loss_last_eighth_mean"])


def test_train_limits(tiny_model_dir, tmp_path, capsys):
    document = run_bench("train_limits", tmp_path / "limits.json", capsys, "--model", str(tiny_model_dir),
                         "--data", str(FIXTURES / "tiny-squad.jsonl"), "--questions", "20", "--steps", "10",
                         "--profile-steps", "1", "--variants", "before,preset,before")
    rows = document["results"]["variants"]
    assert [row["variant"] for row in rows] == ["before", "preset", "before"]  # in the order given, repeats run again
    for row in rows:
        assert len(row["losses"]) == 10 and len(row["resident_mib_per_tenth"]) == 10
        assert 0 < row["share_of_matmul_rate"] and row["peak_resident_mib"] > 0
    assert [p["variant"] for p in document["results"]["profiles"]] == ["buckets", "now", "attention-dropout-0"]
    for profile in document["results"]["profiles"]:
        assert sum(profile["share_of_cpu_time"].values()) == pytest.approx(1.0)
        assert profile["share_of_cpu_time"]["matmul"] > 0
        assert profile["share_of_cpu_time"]["dropout random numbers"] > 0  # PyTorch's, then train_job.dropout's
    assert document["results"]["matmul_rate"]["gflop_per_s"] > 0
    before = (rows[0]["windows_per_s"] + rows[2]["windows_per_s"]) / 2  # a repeated variant: the mean of its runs
    assert document["ratios"]["preset_vs_before_windows_per_s"] == pytest.approx(rows[1]["windows_per_s"] / before)


def test_step_roofline_counts_the_bytes_an_op_moves_and_the_flops_a_matmul_does():
    import torch

    from bench.step_roofline import OpMeter

    a, b, c = torch.ones(1000), torch.ones(1000), torch.empty(1000)
    x, y = torch.ones(8, 16, dtype=torch.bfloat16), torch.ones(16, 4, dtype=torch.bfloat16)
    meter = OpMeter()
    with meter.mode():
        torch.add(a, b)  # two read, one written: 12,000 bytes
        torch.add(a, b, out=c)  # the same, into c (written, not read)
        a.mul_(2)  # read and written
        c.copy_(b)  # b read, c written
        a.view(10, 100).t()  # views: nothing moves
        torch.mm(x, y)
    ops = meter.ops
    assert ops["add"]["bytes"] == 2 * 12_000 and ops["add"]["calls"] == 2
    assert ops["mul_"]["bytes"] == 8_000 and ops["copy_"]["bytes"] == 8_000
    assert ops["view"]["bytes"] == 0 and ops["t"]["bytes"] == 0 and ops["transpose"]["bytes"] == 0
    assert ops["mm"]["flops"] == 2 * 8 * 16 * 4 and meter.matmul_shapes == {((8, 16), (16, 4), torch.bfloat16)}


def test_step_roofline(tiny_model_dir, tmp_path, capsys):
    document = run_bench("step_roofline", tmp_path / "roofline.json", capsys, "--model", str(tiny_model_dir),
                         "--length", "32", "--steps", "1")
    results, ratios = document["results"], document["ratios"]
    assert "_fused_adamw_" in results["ops"] and results["matmul"]["flops"] > 0 and results["other"]["bytes"] > 0
    assert len(results["machine"]["bandwidth_gb_s_by_bytes"]) == 14 and results["machine"]["matmul"]["gflop_per_s"] > 0
    assert ratios["step_share_of_matmul_rate"] > 0  # timings of a tiny model beside other tests: no bound above
    for name in ("best_share_without_fusion", "matmul_share_of_op_seconds"):  # shares of sums, below 1 by construction
        assert 0 < ratios[name] < 1
    # the floor adds the other ops' bytes at the machine's bandwidth to its matmuls at the machine's rate
    floor_other = sum(op["floor_seconds"] for name, op in results["ops"].items() if not op["flops"])
    floor_matmul = ratios["loop_matmuls_share_of_matmul_rate"] * results["matmul"]["seconds"]
    assert ratios["best_share_without_fusion"] == pytest.approx(floor_matmul / (floor_matmul + floor_other))


def test_forward_batches(tiny_model_dir, tmp_path, capsys):
    document = run_bench("forward_batches", tmp_path / "forward.json", capsys, "--model", str(tiny_model_dir),
                         "--data", str(FIXTURES / "tiny-squad.jsonl"), "--questions", "20", "--backends", "torch,autocast")
    runs = document["results"]["runs"]
    assert [(run["backend"], run["variant"]) for run in runs] == [
        ("torch", "windows"), ("torch", "tokens"), ("autocast", "windows"), ("autocast", "tokens")]
    assert all(run["windows"] > 0 and run["windows_per_s"] > 0 and 0 <= run["f1"] <= 100 for run in runs)
    assert document["ratios"]["torch_tokens_vs_windows_windows_per_s"] == pytest.approx(
        runs[1]["windows_per_s"] / runs[0]["windows_per_s"])
    assert document["settings"]["cpu_batch_tokens"] == 4096


def test_a_fresh_process_returns_its_last_line_and_stops_the_benchmark_with_its_errors(tmp_path):
    from bench.benchlib import in_fresh_process

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"windows_per_s": [1.5, 2]}')
    bad.write_text("not JSON")
    assert in_fresh_process("json.tool", "--compact", str(good)) == {"windows_per_s": [1.5, 2]}
    with pytest.raises(SystemExit, match=r"(?s)python -m json.tool .*bad.json failed \(exit 1\).*Expecting value"):
        in_fresh_process("json.tool", str(bad))


@pytest.mark.skipif(not tcmalloc_library(), reason="needs tcmalloc (Debian: apt-get install libtcmalloc-minimal4)")
def test_train_limits_runs_the_presets_step_on_tcmalloc_and_it_learns_the_same(tiny_model_dir, tmp_path, capsys):
    document = run_bench("train_limits", tmp_path / "limits.json", capsys, "--model", str(tiny_model_dir),
                         "--data", str(FIXTURES / "tiny-squad.jsonl"), "--questions", "20", "--steps", "10",
                         "--profile-steps", "0", "--variants", "preset,preset-tcmalloc")
    glibc, tcmalloc = document["results"]["variants"]
    assert (glibc["allocator"], tcmalloc["allocator"]) == ("glibc", "tcmalloc")
    assert tcmalloc["losses"] == glibc["losses"]  # the allocator changes where tensors live, not what is computed


def test_ray_overhead_names_rays_processes():
    from bench.ray_overhead import process_name

    assert process_name([b"ray::RayTrainWorker.train_fn", b""]) == "ray::RayTrainWorker.train_fn"
    assert process_name([b"/usr/bin/python3.11", b"-m", b"train_job", b"--preset", b"squad-minilm"]) == "python train_job"
    assert process_name([b"/venv/bin/python", b"/venv/lib/ray/dashboard/dashboard.py", b"--x"]) == "python dashboard.py"
    assert process_name([b"/venv/lib/ray/core/src/ray/gcs/gcs_server", b"--port"]) == "gcs_server"
    dashboard_module = b"ray-dashboard-MetricsHead-0 (/venv/bin/python -B -c \"from multiprocessing.forkserver " \
                       b"import main; main(25, 27, ['/venv/lib/python3.11/site-packages'])\")"
    assert process_name([dashboard_module, b""]) == "ray-dashboard-MetricsHead-0"
    assert process_name([b"/venv/bin/python -m train_job --preset squad-minilm", b""]) == "python train_job"


def test_ray_overhead_keeps_the_model_where_the_train_flags_say():
    from bench.ray_overhead import run_output_dir

    scratch = Path("/tmp/scratch/run")
    assert run_output_dir(["--gradient-checkpointing"], scratch) == scratch
    assert run_output_dir(["--negative-ratio", "0.25", "--output-dir", "runs/m"], scratch) == Path("runs/m")


def test_a_services_free_port_is_one_neither_ray_nor_the_kernel_hands_out():
    """Ray's processes bind ports the kernel hands out, so a port free now but from that range can be
    gone when the service binds it (a test failed so: "Failed to bind to address")."""
    import socket

    from bench.local_service import RAY_WORKER_PORTS_END, ephemeral_port_range, free_port

    low, high = ephemeral_port_range()
    assert 1024 < low < high <= 65535
    ports = {free_port() for _ in range(20)}
    for port in ports:
        assert RAY_WORKER_PORTS_END <= port < low
        with socket.socket() as sock:
            sock.bind(("", port))  # free on every interface
    assert len(ports) > 1  # drawn, so two services started at once rarely meet


def test_ray_overhead_reads_a_processs_memory_and_its_peak():
    import resource

    from bench.ray_overhead import resident_mib

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert resident_mib(os.getpid(), "VmHWM") == pytest.approx(own, rel=0.05)
    now = resident_mib(os.getpid())
    block = bytearray(64 * 2**20)  # written (zero-filled) by Python: resident
    assert resident_mib(os.getpid()) - now == pytest.approx(64, abs=8)
    del block
    assert resident_mib(2**22 + 1) == 0.0  # above Linux's largest pid: no such process


def test_ray_overhead_splits_a_processs_memory_by_what_holds_it():
    from multiprocessing import shared_memory

    from bench.ray_overhead import memory_split, resident_mib

    before = memory_split(os.getpid())
    assert sum(before.values()) == pytest.approx(resident_mib(os.getpid()), abs=4)
    block = bytearray(64 * 2**20)  # larger than glibc's mmap threshold: a private mapping of its own
    shared = shared_memory.SharedMemory(create=True, size=32 * 2**20)  # /dev/shm, as Ray's object store
    try:
        shared.buf[:] = b"x" * shared.size
        after = memory_split(os.getpid())
        assert after["anonymous"] - before["anonymous"] == pytest.approx(64, abs=8)
        assert after["shared"] - before["shared"] == pytest.approx(32, abs=4)
    finally:
        del block
        shared.close()
        shared.unlink()
    assert memory_split(2**22 + 1) == {}


def test_ray_overhead_samples_the_run_each_second_and_splits_its_memory_less_often():
    import sys

    from bench.ray_overhead import sample_run

    # a stand-in for the training worker: 96 MiB written, then five seconds of sleep
    child = [sys.executable, "-c", "import time; block = bytearray(96 * 2**20); time.sleep(5)"]
    run = sample_run(child, "python -c", split_every_s=3)
    assert run["returncode"] == 0 and run["seconds"] >= 5
    assert len(run["samples"]) >= 5 and len(run["resident"]) >= 5
    # each sample holds the child (the last may catch it exiting; other processes the machine starts meanwhile
    # are sampled too)
    assert all("python -c" in {name for name, _ in procs.values()} for _, procs, _ in run["samples"][:-1])
    seconds = [second for second, _ in run["split"]]
    assert 2 <= len(seconds) < len(run["resident"]) and all(b - a >= 3 for a, b in zip(seconds, seconds[1:]))
    assert run["peak_mib"] >= 96 and max(mib for _, mib in run["resident"]) >= 96
    assert run["split_at_peak"]["anonymous"] + run["split_at_peak"]["heap"] >= 96
    assert 0 <= run["sampler_seconds"] < run["seconds"] / 4  # it sleeps between samples


def test_ray_overhead_plots_the_workers_memory_and_the_rate_by_tenth(tmp_path):
    from bench.ray_overhead import plot_run

    series = [(second, {"heap": 100 + second, "anonymous": 300, "shared": 20, "files": 250}) for second in range(30)]
    plot_run(series, [{"tenth": n, "windows_per_s": 12.0 + n % 3} for n in range(1, 11)], tmp_path / "memory.png", "a test")
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_overhead_reads_the_rate_of_each_tenth_of_the_epoch(tmp_path):
    """The bar's updates at steps 5, 10, ..., 100; a step takes 1 s up to step 50, 2 s after: the
    first half's tenths at 16 windows/s, the second half's at 8; the worker's CPU share by tenth."""
    from torch.utils.tensorboard import SummaryWriter

    from bench.ray_overhead import TRAINING_WORKER, rate_per_tenth, worker_share_between

    wall = lambda step: 1000.0 + (step if step <= 50 else 50 + 2 * (step - 50))
    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard" / "run"))
    for step in range(5, 101, 5):
        writer.add_scalar("train/windows_per_s", 0.0, step, walltime=wall(step))
    writer.close()
    tenths = rate_per_tenth(tmp_path, windows_per_step=16)
    assert [tenth["steps"] for tenth in tenths[:2]] == [(5, 10), (10, 20)]
    assert [round(tenth["windows_per_s"], 6) for tenth in tenths] == [16.0] * 5 + [8.0] * 5

    # the worker busy on one CPU until 1050, on two after; another process all the while
    samples = [(1000.0 + s, {1: (TRAINING_WORKER, s if s <= 50 else 50 + 2 * (s - 50)), 2: ("raylet", s)}, 0.0)
               for s in range(0, 151)]
    cpus = os.cpu_count()  # a share of the whole machine
    assert worker_share_between(samples, tenths[1]["started"], tenths[1]["ended"]) == pytest.approx(1 / cpus)
    assert worker_share_between(samples, tenths[-1]["started"], tenths[-1]["ended"]) == pytest.approx(2 / cpus)


def test_preprocess(local_ray, tiny_model_dir, tmp_path, capsys):
    document = run_bench(
        "preprocess", tmp_path / "preprocess.json", capsys,
        "--data", str(FIXTURES / "tiny-squad.jsonl"), "--examples", "200", "--tokenizer", str(tiny_model_dir),
        *SMALL_WINDOWS, "--runs", "1", "--cpus", "2", "--concurrency", "2",
    )
    runs = document["results"]["runs"]
    assert [run["method"].split(":")[0] for run in runs] == ["single process", "Ray Data"]
    assert all(run["examples"] == 200 and run["features"] >= 200 for run in runs)
    assert runs[0]["features"] == runs[1]["features"]  # the same windows either way
    assert document["ratios"]["ray_data_best_vs_single_process"] > 0


def test_predict_throughput(local_ray, tiny_model_dir, tmp_path, capsys):
    document = run_bench(
        "predict_throughput", tmp_path / "predict.json", capsys,
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.json"), "--long-documents", "2",
        "--actors", "1", "--cpus", "1", "--memory", "--memory-questions", "30", "--memory-model", str(tiny_model_dir),
    )
    runs = document["results"]["runs"]
    assert [run["method"] for run in runs] == ["single process: answer_questions", "train_job.predict"]
    assert all(run["questions"] == 13 + 2 and run["windows"] >= run["questions"] for run in runs)
    assert runs[0]["windows"] == runs[1]["windows"]
    [memory] = document["results"]["memory"]
    assert memory["questions"] == 30 and memory["driver_peak_rss_mib"] > 0
    assert document["ratios"]["pipeline_1_actors_vs_single_process"] > 0


def test_library_scale_asks_the_same_library_with_and_without_its_vector_index(tmp_path, capsys):
    wards = ["cardiology", "oncology", "maternity", "geriatrics", "surgery", "neurology"]
    distractors = [{"title": ward, "paragraphs": [{
        "context": f"The {ward} ward opens its doors at {hour} o'clock. Visitors sign in at the {ward} desk.",
        "qas": [{"id": f"{ward}-{hour}", "question": "Which ward?", "answers": [{"text": ward, "answer_start": 4}]}],
    } for hour in range(4)]} for ward in wards]
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"version": "1.1", "data": distractors}))
    document = run_bench("library_scale", tmp_path / "scale.json", capsys, "--dev", str(FIXTURES / "tiny-squad.json"),
                         "--train", str(train), "--distractors", "20", "--sizes", "6", "--questions", "6")
    small, whole = document["results"]["sizes"]
    assert small["passages"] == 6 and whole["passages"] == document["settings"]["passages"] >= 24
    for size in (small, whole):  # the index returns the exact search's passages, and the index is on disk
        assert size["same_ranking"] == 1.0 and size["indexed_recall@5"] == size["exact_recall@5"]
        assert size["size_mb_indexed"] > size["size_mb_before"] and size["vectors"] > size["passages"]
    assert document["ratios"]["same_ranking_largest"] == 1.0


BENCH_SCRIPTS = sorted(path.stem for path in (REPO / "bench").glob("*.py")
                       if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_every_script_has_help(script, capsys):
    assert len(BENCH_SCRIPTS) >= 20  # every runnable module of bench/ is here
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{script}").main(["--help"])
    assert exited.value.code == 0 and "--out" in capsys.readouterr().out


def parse_step(argv: list[str]):
    """Parse one GPU-suite step's command line with that program's own parser (nothing runs)."""
    assert argv[0] == "-m" and argv[1].startswith("bench.")
    return importlib.import_module(argv[1]).parse_args(argv[2:])


@pytest.mark.parametrize("dry_run", [False, True])
def test_gpu_suite_steps_are_valid_command_lines(tmp_path, dry_run):
    from bench import gpu_suite

    args = gpu_suite.parse_args(["--out-dir", str(tmp_path)] + (["--dry-run"] if dry_run else []))
    commands = gpu_suite.step_commands(args, tmp_path, str(tmp_path / "model"))
    assert list(commands) == list(gpu_suite.STEPS)
    parsed = {step: parse_step(argv) for step, argv in commands.items()}
    assert parsed["serve"].modes == ["batched", "single"] and parsed["serve"].gpu is not dry_run
    assert parsed["train"].gpu is not dry_run and parsed["cuda_graph"].gpu is not dry_run
    assert parsed["squad"].gpu is not dry_run and parsed["squad"].out == tmp_path / "squad.json"
    if not dry_run:
        assert parsed["squad"].train.name == gpu_suite.SQUAD_FILES["train"] and parsed["squad"].max_train_samples is None
        assert sum(gpu_suite.GPU_BUDGET_S.values()) <= 9 * 60


def test_gpu_suite_dry_run_writes_the_summary(tmp_path):
    out = tmp_path / "suite"
    result = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--dry-run", "--steps", "cuda_graph,squad", "--out-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    suite = json.loads((out / "suite.json").read_text())
    cuda_graph, squad = suite["steps"]
    assert suite["dry_run"] and [cuda_graph["status"], squad["status"]] == ["ok", "ok"]
    assert cuda_graph["figures"]["same_answers"] == "4/4"  # the padded, compiled runner answers as eager PyTorch
    assert 0 <= squad["figures"]["f1"] <= 100 and squad["figures"]["train_windows_per_s"] > 0
    assert "| cuda_graph | same_answers | 4/4 |" in (out / "suite.md").read_text()


def test_ask_latency_asks_for_the_passages_given_else_leaves_the_services_default():
    from bench.ask_latency import ask_body

    assert ask_body("Who?", None) == {"question": "Who?"}
    assert ask_body("Who?", 8) == {"question": "Who?", "passages": 8}


def test_machine_drift_times_the_same_work_in_rounds(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "drift.json"
    document = run_bench("machine_drift", out, capsys, "--model", str(tiny_model_dir), "--length", "32",
                         "--steps-per-round", "2", "--minutes", "0.05", "--opening-minutes", "0.02")
    rounds, ratios = document["results"]["rounds"], document["ratios"]
    starts = [r["started_s"] for r in rounds]
    assert len(rounds) >= 2 and starts == sorted(starts) and starts[-1] < 0.05 * 60
    assert all(r["median_step_ms"] > 0 for r in rounds)
    opening = [r["median_step_ms"] for r in rounds if r["started_s"] < 0.02 * 60]
    rest = [r["median_step_ms"] for r in rounds if r["started_s"] >= 0.02 * 60]
    assert ratios["rest_vs_opening_step_time"] == pytest.approx(statistics.median(rest) / statistics.median(opening), abs=5e-4)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
