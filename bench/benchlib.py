"""Helpers shared by the bench scripts: machine facts, data, timing, processes, the table and the JSON
(the models they measure: ``bench.models``)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
SQUAD_SAMPLE_TRAIN = SHARED_DATA / "squad-v1.1-sample" / "train-University_of_Notre_Dame.json"
SQUAD_SAMPLE_DEV = SHARED_DATA / "squad-v1.1-sample" / "dev-Super_Bowl_50.json"
SQUAD_FULL_TRAIN = SHARED_DATA / "squad-v1.1-full" / "train-v1.1.reconstructed.json.gz"
SQUAD_FULL_DEV = SHARED_DATA / "squad-v1.1-full" / "dev-v1.1.reconstructed.json.gz"
QUICKSTART_TRAIN = REPO / "train_job" / "quickstart_data" / "quickstart-train.jsonl"
QUICKSTART_VALIDATION = REPO / "train_job" / "quickstart_data" / "quickstart-validation.jsonl"

# --- machine and load --------------------------------------------------------------------------


CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu_model, cpu_flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                # the vector/matrix extensions that decide fp32 vs bf16 speed on CPU
                cpu_flags = sorted({f for f in line.split(":", 1)[1].split() if f in CPU_FLAGS})
                break
    except OSError:
        pass
    try:
        mem_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                           if line.startswith("MemTotal")).split()[1])
        ram_gib = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration):
        ram_gib = None
    info = {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_flags": cpu_flags,
        "ram_gib": ram_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    for package in ("ray", "transformers", "tokenizers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


# --- data --------------------------------------------------------------------------------------


def default_train_data() -> Path:
    """The real SQuAD sample article when the development checkout has ../shared, else the quickstart set."""
    return SQUAD_SAMPLE_TRAIN if SQUAD_SAMPLE_TRAIN.is_file() else QUICKSTART_TRAIN


def default_eval_data() -> Path:
    return SQUAD_SAMPLE_DEV if SQUAD_SAMPLE_DEV.is_file() else QUICKSTART_VALIDATION


def data_label(path: Path) -> str:
    """A path for the report: relative to the repo's parent when it lies there (never machine-specific)."""
    path = Path(path).resolve()
    for base, prefix in ((REPO, ""), (REPO.parent, "../")):
        try:
            return prefix + str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


# --- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.started


# --- reporting ---------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table of ``rows`` (dicts) in ``columns`` order."""

    def show(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return str(value)

    cells = [[show(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) if cells else len(column)
              for i, column in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    sys.stdout.flush()


def save_figure(figure, path: Path, *, dpi: int = 110) -> None:
    """A matplotlib figure, laid out, as a PNG at ``path`` (its folder made)."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    print(f"wrote {path}")


def markdown_table(rows: list[dict]) -> str:
    """``rows`` (dicts, the first one's keys as columns) as a GitHub markdown table, for BENCHMARKS.md."""
    def show(value) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, benchmark: str, ratios: dict, results: dict, settings: dict,
               load_before: list[float]) -> Path:
    """The result file: ratios first, then the figures, the settings, the machine and the command."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": benchmark,
        "ratios": ratios,
        "results": results,
        "settings": settings,
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "command": " ".join(["python -m bench." + Path(sys.argv[0]).stem, *map(shlex.quote, sys.argv[1:])]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return path


def quiet_libraries() -> None:
    """Fewer progress bars and warnings in the benchmark output; no Hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None):
    """A private local Ray for the measurement (never a cluster that happens to run here), shut down
    after it with its Serve. A Ray this process already runs (a caller that imports the script and
    calls ``main``, as the test suite does) is used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Workers' logs stay in Ray's log files (BENCH_VERBOSE=1 streams them here): printing them would cost
    # this process CPU time, and it is the load generator of the serve benchmarks.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=os.environ.get("BENCH_VERBOSE") == "1", logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        if "ray.serve" in sys.modules:
            from ray import serve

            serve.shutdown()
        ray.shutdown()


def run_in_workdir(measure, args, prefix: str) -> int:
    """``measure(args, workdir, load_before)`` in a fresh temporary directory, removed afterwards."""
    quiet_libraries()
    load_before = load_average()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return measure(args, workdir, load_before)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def in_fresh_process(module: str, *flags: str, env: dict[str, str] | None = None) -> dict:
    """``python -m <module> <flags>`` in a child process (with ``env`` added to its environment), for a
    measurement that must not inherit this one's state (its allocator's heap, oneDNN's primitives, what
    it imported), and the JSON object the child printed last (``report_to_parent``). A child that fails
    stops the benchmark with its errors."""
    child = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                           env={**os.environ, **(env or {})})
    if child.returncode != 0:
        raise SystemExit(f"python -m {module} {shlex.join(flags)} failed (exit {child.returncode}):\n"
                         f"{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def report_to_parent(result: dict) -> int:
    """The child's side of ``in_fresh_process``: ``result`` as its output's last line."""
    print(json.dumps(result), flush=True)
    return 0
