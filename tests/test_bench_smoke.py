"""The bench scripts run end to end with a tiny model and tiny settings, and write valid JSON.

Each script runs as a subprocess (its own private local Ray, HTTP on 127.0.0.1 only) with a hard
timeout; the figures themselves are not checked, only that they are there.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES

# Each script starts a Ray of its own, in its own process.
pytestmark = pytest.mark.usefixtures("isolated_from_ray")

REPO = Path(__file__).resolve().parent.parent
SMALL_WINDOWS = ["--max-length", "48", "--stride", "16", "--max-question-length", "20"]
COMMON_KEYS = {"benchmark", "ratios", "results", "settings", "machine", "load_average", "command", "finished_at"}


def run_bench(script: str, out: Path, *flags: str, timeout: int = 240) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--out", str(out), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    document = json.loads(out.read_text(encoding="utf-8"))
    assert COMMON_KEYS <= document.keys()
    assert list(document)[:2] == ["benchmark", "ratios"]  # ratios first
    assert document["machine"]["nproc"] >= 1 and document["machine"]["torch"]
    assert "Ratios" in result.stdout  # the printed table
    return document


TRAIN_FLAGS = ["--data", str(FIXTURES / "tiny-squad.jsonl"), "--eval-data", str(FIXTURES / "tiny-squad.json"),
               *SMALL_WINDOWS, "--batch-size", "4", "--epochs", "1", "--eval-questions", "2", "--cpus", "1"]


def test_train_throughput(tiny_model_dir, tmp_path):
    pytest.importorskip("accelerate", reason="the seed recipe's HF Trainer needs accelerate (the dev extra)")
    document = run_bench("train_throughput", tmp_path / "train.json", "--model", str(tiny_model_dir), *TRAIN_FLAGS,
                         "--seed-steps", "2", "--warmup-steps", "1")
    results, ratios = document["results"], document["ratios"]
    assert results["seed"]["features_per_s"] > 0 and results["ours"]["features_per_s"] > 0
    assert ratios["ours_vs_seed_features_per_s"] > 0


def test_train_scaling_and_variants(tiny_model_dir, tmp_path):
    document = run_bench("train_scaling", tmp_path / "scaling.json", "--model", str(tiny_model_dir), *TRAIN_FLAGS)
    assert [row["workers"] for row in document["results"]["scaling"]] == [1, 2]
    assert document["ratios"]["scaling_efficiency_2_workers"] > 0
    document = run_bench("train_variants", tmp_path / "variants.json", "--model", str(tiny_model_dir), *TRAIN_FLAGS,
                         "--variant-features", "8")
    variants = document["results"]["variants"]
    assert len(variants) >= 5 and all(row["features_per_s"] > 0 for row in variants)


def test_train_limits(tiny_model_dir, tmp_path):
    document = run_bench("train_limits", tmp_path / "limits.json", "--model", str(tiny_model_dir),
                         "--data", str(FIXTURES / "tiny-squad.jsonl"), "--questions", "20", "--steps", "10",
                         "--profile-steps", "1", "--variants", "before,now")
    variants = {row["variant"]: row for row in document["results"]["variants"]}
    assert set(variants) == {"before", "now"}
    for row in variants.values():
        assert len(row["losses"]) == 10 and len(row["resident_mib_per_tenth"]) == 10
        assert 0 < row["share_of_matmul_rate"] and row["peak_resident_mib"] > 0
    assert [p["attention_dropout"] for p in document["results"]["profiles"]] == [None, 0.0]
    for profile in document["results"]["profiles"]:
        assert sum(profile["share_of_cpu_time"].values()) == pytest.approx(1.0)
        assert profile["share_of_cpu_time"]["matmul"] > 0
    assert document["results"]["matmul_rate"]["gflop_per_s"] > 0
    assert document["ratios"]["now_vs_before_windows_per_s"] > 0


def test_ray_overhead_names_rays_processes():
    from bench.ray_overhead import process_name

    assert process_name([b"ray::RayTrainWorker.train_fn", b""]) == "ray::RayTrainWorker.train_fn"
    assert process_name([b"/usr/bin/python3.11", b"-m", b"train_job", b"--preset", b"squad-minilm"]) == "python train_job"
    assert process_name([b"/venv/bin/python", b"/venv/lib/ray/dashboard/dashboard.py", b"--x"]) == "python dashboard.py"
    assert process_name([b"/venv/lib/ray/core/src/ray/gcs/gcs_server", b"--port"]) == "gcs_server"


def test_preprocess(tiny_model_dir, tmp_path):
    document = run_bench(
        "preprocess", tmp_path / "preprocess.json",
        "--data", str(FIXTURES / "tiny-squad.jsonl"), "--examples", "200", "--tokenizer", str(tiny_model_dir),
        *SMALL_WINDOWS, "--runs", "1", "--cpus", "2", "--concurrency", "2",
    )
    runs = document["results"]["runs"]
    assert [run["method"].split(":")[0] for run in runs] == ["single process", "Ray Data"]
    assert all(run["examples"] == 200 and run["features"] >= 200 for run in runs)
    assert runs[0]["features"] == runs[1]["features"]  # the same windows either way
    assert document["ratios"]["ray_data_best_vs_single_process"] > 0


def test_serve_load(tiny_model_dir, tmp_path):
    document = run_bench(
        "serve_load", tmp_path / "serve.json",
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"),
        "--requests", "24", "--concurrency", "4", "--warmup", "2", "--max-batch-size", "4", "--cpus", "2",
        "--replica-cpus", "0.5", "--time-limit-s", "90",
    )
    modes = {row["mode"]: row for row in document["results"]["modes"]}
    assert set(modes) == {"batched", "unbatched"}
    for row in modes.values():
        assert row["answered"] == 24 and row["errors"] == 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["windows_per_s"] >= row["requests_per_s"] > 0
    assert modes["unbatched"]["questions_per_model_call"] == 1
    assert document["ratios"]["batched_vs_unbatched_requests_per_s"] > 0


def test_cold_start(tiny_model_dir, tmp_path):
    document = run_bench(
        "cold_start", tmp_path / "cold.json",
        "--model", str(tiny_model_dir), "--repeats", "1", "--cpus", "2", "--replica-cpus", "0.5",
    )
    [row] = document["results"]["cold_starts"]
    assert 0 < row["next_request_s"] < row["time_to_first_answer_s"]
    assert document["ratios"]["cold_start_median_s"] > 0


def test_serve_soak(tiny_model_dir, tmp_path):
    document = run_bench(
        "serve_soak", tmp_path / "soak.json",
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.jsonl"), "--clients", "4",
        "--duration-s", "8", "--long-every", "3", "--long-chars", "2000", "--kill-at-s", "3", "--cpus", "2",
        "--replica-cpus", "0.5",
    )
    soak = document["results"]["soak"]
    assert soak["answered"] > 0 and soak["answered_long"] > 0 and soak["killed_at_s"] >= 3
    assert soak["outside_200_503"] == 0 and soak["offset_mismatches"] == 0
    assert soak["replicas_after"] == {"RUNNING": 1}


def test_predict_throughput(tiny_model_dir, tmp_path):
    document = run_bench(
        "predict_throughput", tmp_path / "predict.json",
        "--model", str(tiny_model_dir), "--data", str(FIXTURES / "tiny-squad.json"), "--long-documents", "2",
        "--actors", "1", "--cpus", "2", "--memory", "--memory-questions", "30", "--memory-model", str(tiny_model_dir),
    )
    runs = document["results"]["runs"]
    assert [run["method"] for run in runs] == ["single process: answer_questions", "train_job.predict"]
    assert all(run["questions"] == 13 + 2 and run["windows"] >= run["questions"] for run in runs)
    assert runs[0]["windows"] == runs[1]["windows"]
    [memory] = document["results"]["memory"]
    assert memory["questions"] == 30 and memory["driver_peak_rss_mib"] > 0
    assert document["ratios"]["pipeline_1_actors_vs_single_process"] > 0


BENCH_SCRIPTS = sorted(path.stem for path in (REPO / "bench").glob("*.py")
                       if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_every_script_has_help(script, capsys):
    import importlib

    assert len(BENCH_SCRIPTS) >= 20  # every runnable module of bench/ is here
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{script}").main(["--help"])
    assert exited.value.code == 0 and "--out" in capsys.readouterr().out


def parse_step(argv: list[str]):
    """Parse one GPU-suite step's command line with that program's own parser (nothing runs)."""
    import importlib

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
