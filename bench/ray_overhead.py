"""What Ray's own processes take from a one-machine training run: CPU time by process, sampled from /proc,
and the training worker's peak resident memory.

    python -m bench.ray_overhead                      # the squad-minilm preset's recipe on 1,000 questions
    python -m bench.ray_overhead -- --max-train-samples 4000

Runs ``python -m train_job`` (its own local Ray) with the preset's recipe on a slice of SQuAD train
(``../shared``; else the quickstart data), reads every process's CPU time from ``/proc`` each
second, and reports, over the training epoch only (from the training worker's first busy second
to its last), each process's share of the machine's CPU time: the training worker, the driver, and
each of Ray's own (GCS, raylet, dashboard, agents, Train's controller and helpers, idle workers);
and the training worker's peak resident memory (``VmHWM``), the validation pass included, and its
resident memory each second, every ten seconds split by what holds it (``memory_split``: glibc's main
heap, other anonymous memory, shared memory such as Ray's object store, mapped files; plotted beside
the JSON as a PNG of the same name, the rate by tenth below it); its own sampling's share of the CPU
(``sampler_share_of_cpu``: time the run did not get); and from the run's ``metrics.json`` its
windows/s, loss and F1, so that a setting's cost in speed and its effect on what was learned come
with its memory. Whether the rate holds over the epoch: the run reports to tensorboard, and the
bench reads its windows/s at each of the bar's twenty updates (the wall time of each event) as the
rate over each tenth of the epoch, beside the training worker's share of the CPU over the same tenth.

    python -m bench.ray_overhead --out bench/results/ray_overhead_checkpointed.json -- --gradient-checkpointing

The run's model is written to a scratch directory and removed with it, unless ``--output-dir`` is
among the train_job flags (then it is kept there, for ``train_job.predict`` or ``bench.squad_accuracy``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import benchlib
from train_job import run_dir

DEFAULT_OUT = benchlib.RESULTS / "ray_overhead.json"
TRAINING_WORKER = "ray::RayTrainWorker"
TICKS = os.sysconf("SC_CLK_TCK")
# Reading the worker's smaps walks its 1,300-odd mappings (30 ms); once a second that made this bench
# take 5 % of a 2-core machine from the run it measures. Its resident size is still read each second.
SPLIT_EVERY_S = 10


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1000, help="training questions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    parser.add_argument("train_flags", nargs="*", help="more train_job flags, after --")
    return parser.parse_args(argv)


def process_times() -> dict[int, tuple[str, float]]:
    """``{pid: (name, CPU seconds)}`` of every process readable now."""
    times = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        times[int(entry.name)] = (process_name(argv), (int(fields[11]) + int(fields[12])) / TICKS)
    return times


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others (``steal`` in ``/proc/stat``), all CPUs together: a
    run that lost much of it did not have the machine to itself."""
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[8]) / TICKS


def resident_mib(pid: int, field: str = "VmRSS") -> float:
    """The process's resident set (``VmRSS``) or its peak (``VmHWM``) in MiB; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_split(pid: int) -> dict[str, float]:
    """The process's resident memory in MiB by what holds it, from ``/proc/<pid>/smaps``: ``heap``
    (the segment grown with ``brk``: glibc's main arena, or tcmalloc's pages), ``anonymous`` (every
    other private anonymous mapping: other threads' arenas, blocks glibc maps on their own, stacks),
    ``shared`` (shared memory, such as Ray's object store mapped into a worker that reads from it) and
    ``files`` (libraries, mapped files). Empty once the process is gone."""
    split = {"heap": 0, "anonymous": 0, "shared": 0, "files": 0}
    kind = "files"
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                if line.startswith("Rss:"):
                    split[kind] += int(line.split()[1])
                elif not line[:1].isupper():  # a mapping's header: address range, permissions, ..., path
                    fields = line.split(maxsplit=5)
                    path = fields[5].strip() if len(fields) > 5 else ""
                    if path == "[heap]":
                        kind = "heap"
                    elif fields[1][3] == "s" or path.startswith("/dev/shm") or path.startswith("/SYSV"):
                        kind = "shared"
                    elif not path or path.startswith("["):
                        kind = "anonymous"
                    else:
                        kind = "files"
    except OSError:
        return {}
    return {name: kib / 1024 for name, kib in split.items()}


def plot_run(split_over_time: list, tenths: list[dict], path: Path, title: str) -> None:
    """The training worker's resident memory over the run, stacked by what holds it (``memory_split``),
    and below it the epoch's windows/s by tenth (``rate_per_tenth``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["files", "shared", "heap", "anonymous"]
    labels = {"files": "mapped files (library code)", "shared": "shared memory (Ray's object store)",
              "heap": "the heap segment (glibc's main arena; tcmalloc's pages)",
              "anonymous": "thread arenas, stacks, other anonymous"}
    seconds = [second for second, _ in split_over_time]
    fig, (ax, rate) = plt.subplots(2, 1, figsize=(7, 6.8), height_ratios=[3, 1.4])
    ax.stackplot(seconds, *[[split[kind] for _, split in split_over_time] for kind in kinds],
                 labels=[labels[kind] for kind in kinds], alpha=0.8)
    ax.axhline(1536, color="black", linewidth=0.8, linestyle=":", label="1.5 GiB")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("resident MiB")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    numbers = [tenth["tenth"] for tenth in tenths]
    rate.bar(numbers, [tenth["windows_per_s"] for tenth in tenths], color="tab:gray")
    rate.set_xticks(numbers)
    rate.set_xlabel("tenth of the epoch")
    rate.set_ylabel("windows/s")
    benchlib.save_figure(fig, path)


def process_name(argv: list[bytes]) -> str:
    """A readable name: Ray's actor or worker title, a title the process set, the binary, or the Python
    module run."""
    words = [word.decode(errors="replace") for word in argv if word]
    if not words:
        return "?"
    if len(words) == 1 and " " in words[0]:  # a title the process set itself, e.g. the dashboard's modules
        words = words[0].split()
        if not words[0].startswith("/"):
            return words[0]
    if words[0].startswith("ray::"):
        return words[0].split()[0]
    binary = Path(words[0]).name
    if binary.startswith("python"):
        module = next((words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"), None)
        script = next((Path(word).name for word in words[1:] if word.endswith(".py")), None)
        return f"python {module or script or ('-c' if '-c' in words else '')}".strip()
    return binary


def run_output_dir(train_flags: list[str], default: Path) -> Path:
    """Where the measured run writes its model: ``--output-dir`` among the train_job flags (the model is
    then kept, to be evaluated), else ``default`` in the benchmark's scratch directory."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output-dir", type=Path, default=default)
    return parser.parse_known_args(train_flags)[0].output_dir


def rate_per_tenth(output_dir: Path, windows_per_step: float) -> list[dict]:
    """The epoch's windows/s over each tenth of its steps, from the run's tensorboard events (the bar's
    updates, each with its step and wall time): windows per step over the seconds between the updates
    nearest the tenth's bounds. The bar's first update comes a twentieth in, so the first tenth is
    the half after it, without the first step's set-up. Each tenth's ``started`` and ``ended`` wall
    times line it up with the CPU samples."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((output_dir / run_dir.TENSORBOARD).iterdir()))).Reload()
    points = [(event.step, event.wall_time) for event in events.Scalars("train/windows_per_s")]
    last = points[-1][0]
    bounds = [min(points, key=lambda point: abs(point[0] - last * tenth / 10)) for tenth in range(11)]
    return [{"tenth": tenth + 1, "steps": (start[0], end[0]), "started": start[1], "ended": end[1],
             "windows_per_s": windows_per_step * (end[0] - start[0]) / (end[1] - start[1])}
            for tenth, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def worker_share_between(samples: list, started: float, ended: float) -> float:
    """The training worker's share of the machine's CPU between two wall times, from ``samples``."""
    inside = [(moment, procs) for moment, procs, _ in samples if started <= moment <= ended]
    if len(inside) < 2:
        return float("nan")
    cpu = lambda procs: sum(cpu for name, cpu in procs.values() if name == TRAINING_WORKER)
    (first, first_procs), (final, final_procs) = inside[0], inside[-1]
    return (cpu(final_procs) - cpu(first_procs)) / ((final - first) * os.cpu_count())


def sample_run(command: list[str], worker: str, split_every_s: float = SPLIT_EVERY_S) -> dict:
    """Run ``command`` and sample every process it starts, once a second until it exits: its
    ``returncode`` and ``seconds``; ``samples``, each
    ``(wall time, {pid: (name, CPU seconds)}, stolen seconds)`` (wall time: tensorboard's events carry
    it); the ``worker`` processes' peak (``peak_mib``), resident memory each second (``resident``:
    ``(second, MiB)``) and its split every ``split_every_s`` (``split``: ``(second, {kind: MiB})``;
    ``split_at_peak``, the largest); and ``sampler_seconds``, this sampling's own CPU time: time the
    run did not get."""
    before, own_before = set(process_times()), time.process_time()
    launched = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, peak_mib, resident, split_over_time, split_at_peak = [], 0.0, [], [], {}
    while child.poll() is None:
        procs = {pid: value for pid, value in process_times().items() if pid not in before}
        samples.append((time.time(), procs, stolen_seconds()))
        workers = [pid for pid, (name, _) in procs.items() if name == worker]
        peak_mib = max([peak_mib] + [resident_mib(pid, "VmHWM") for pid in workers])
        if workers:
            second = round(samples[-1][0] - samples[0][0])
            resident.append((second, round(sum(map(resident_mib, workers)))))
            if not split_over_time or second - split_over_time[-1][0] >= split_every_s:
                split = {kind: sum(memory_split(pid).get(kind, 0.0) for pid in workers)
                         for kind in ("heap", "anonymous", "shared", "files")}
                split_over_time.append((second, {kind: round(mib) for kind, mib in split.items()}))
                if sum(split.values()) > sum(split_at_peak.values()):
                    split_at_peak = split
        time.sleep(1.0)
    return {"returncode": child.returncode, "seconds": time.monotonic() - launched, "samples": samples,
            "peak_mib": peak_mib, "resident": resident, "split": split_over_time, "split_at_peak": split_at_peak,
            "sampler_seconds": time.process_time() - own_before}


def measure(args, workdir: Path, load_before: list[float]) -> int:
    data = benchlib.SQUAD_FULL_TRAIN if benchlib.SQUAD_FULL_TRAIN.is_file() else benchlib.QUICKSTART_TRAIN
    output_dir = run_output_dir(args.train_flags, workdir / "run")
    command = [sys.executable, "-m", "train_job", "--preset", "squad-minilm", "--train-file", str(data),
               "--max-train-samples", str(args.questions), "--holdout-questions", "100", "--max-eval-samples", "100",
               "--output-dir", str(output_dir), "--checkpoint-every-steps", "100000", "--report-to", "tensorboard",
               *args.train_flags]
    run = sample_run(command, TRAINING_WORKER)
    command_seconds, samples, worker_peak_mib = run["seconds"], run["samples"], run["peak_mib"]
    worker_split, split_at_peak = run["split"], run["split_at_peak"]
    if run["returncode"] != 0:
        raise SystemExit(f"train_job failed (exit {run['returncode']}): {' '.join(command)}")
    busy = [i for i, (_, procs, _) in enumerate(samples) if any(name == TRAINING_WORKER for name, _ in procs.values())]
    (started, start_procs, start_stolen), (ended, end_procs, end_stolen) = samples[busy[0]], samples[busy[-1]]
    seconds, cpus = ended - started, os.cpu_count()
    shares: dict[str, float] = {}
    for pid, (name, cpu) in end_procs.items():
        used = cpu - start_procs.get(pid, (name, 0.0))[1]
        shares[name] = shares.get(name, 0.0) + used / (seconds * cpus)
    driver = shares.pop("python train_job", 0.0)
    worker = shares.pop(TRAINING_WORKER, 0.0)
    rows = sorted(({"process": name, "share_of_cpu": share} for name, share in shares.items() if share > 0),
                  key=lambda row: -row["share_of_cpu"])
    trained = json.loads((output_dir / "metrics.json").read_text())
    # the preset's batches are windows, not whole questions: each step takes a batch on every worker
    tenths = rate_per_tenth(output_dir, trained["per_device_batch_size"] * trained["num_workers"])
    for tenth in tenths:
        tenth["training_worker_share_of_cpu"] = worker_share_between(samples, tenth["started"], tenth["ended"])
    ratios = {"ray_own_processes_share_of_cpu": sum(row["share_of_cpu"] for row in rows),
              "training_worker_share_of_cpu": worker, "driver_share_of_cpu": driver,
              "sampler_share_of_cpu": run["sampler_seconds"] / (command_seconds * cpus),
              "training_worker_peak_resident_mib": worker_peak_mib,
              # the run's own figures: what a setting costs in speed, and whether it changed what was learned
              "train_windows_per_s": trained["train_samples_per_second"], "train_loss": trained["train_loss"],
              "validation_f1": trained["f1"],
              # steady: the last tenth of the epoch against the second (the first includes the warm-up)
              "last_vs_second_tenth_windows_per_s": tenths[-1]["windows_per_s"] / tenths[1]["windows_per_s"]}
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("The training worker's largest resident sample, by what holds it (MiB)",
                         [{"held by": kind, "MiB": mib} for kind, mib in split_at_peak.items()], ["held by", "MiB"])
    benchlib.print_table(f"Ray's own processes over {seconds:.0f} s of training ({cpus} CPUs)", rows,
                         ["process", "share_of_cpu"])
    benchlib.print_table("The epoch by tenths", tenths, ["tenth", "steps", "windows_per_s", "training_worker_share_of_cpu"])
    stolen = (end_stolen - start_stolen) / (seconds * cpus)
    print(f"CPU time stolen by the hypervisor over the epoch: {stolen:.1%}")
    plot_run(worker_split, tenths, args.out.with_suffix(".png"),
             f"Training worker on {trained['allocator']}, {args.questions:,} questions: "
             f"peak {worker_peak_mib:,.0f} MiB, {ratios['train_windows_per_s']:.1f} windows/s")
    benchlib.write_json(args.out, "ray_overhead", ratios,
                        {"processes": rows, "training_seconds": seconds, "command_seconds": command_seconds,
                         "stolen_share_of_cpu": stolen,
                         "training_worker_allocator": trained["allocator"], "tenths": tenths,
                         "training_worker_resident_mib_per_second": run["resident"],
                         "training_worker_resident_split_at_peak_mib": split_at_peak,
                         "training_worker_resident_split_mib": worker_split},
                        {"command": command, "data": benchlib.data_label(data)}, load_before)
    return 0


def main(argv=None) -> int:
    return benchlib.run_in_workdir(measure, parse_args(argv), prefix="bench-ray-overhead-")


if __name__ == "__main__":
    sys.exit(main())
