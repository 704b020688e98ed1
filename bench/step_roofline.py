"""What bounds the preset's training step on this CPU: its matmuls against the machine's matmul rate,
everything else against the machine's memory bandwidth.

    python -m bench.step_roofline                      # the squad-minilm preset's step at 160 tokens
    python -m bench.step_roofline --length 256

``bench.train_limits`` reports the loop's model FLOP/s as a share of the machine's matmul rate (the
issue's "≥ 50 %"). This says why the share is what it is, op by op. One step of the preset as it
trains (``train_job.optim.train_step`` with its ``--cheap-dropout`` and ``--max-batch-tokens``, bf16
autocast where the CPU has it; a batch of the preset's size, ``--length`` tokens each) runs under a
``TorchDispatchMode`` that times every ATen op the forward, the backward and the optimiser
dispatch, and counts what each moves: the bytes of its tensor arguments (read), of the arguments
its schema says it writes, and of the tensors it returns new (views and allocations move nothing).
Matmuls are counted in FLOPs.

The machine, in the same process and threads: its matmul rate at the step's own matmul shapes and
dtypes (bf16 under autocast, float32 in its attention), each timed alone, and the bandwidth PyTorch's
element-wise kernels reach (``torch.add(a, b, out=c)``) by the bytes an op moves, from 64 KiB (a
core's cache) to 512 MiB (memory). From these, the step's floor without fusing ops: its matmuls at
the machine's rate plus every other op's bytes at the bandwidth for its size, and the largest share
of the matmul rate a loop that moves those bytes could reach.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench import benchlib
from bench.preset_step import preset_config, preset_training, step_inputs

DEFAULT_OUT = benchlib.RESULTS / "step_roofline.json"
MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}
NOT_READ = {"copy_", "fill_", "zero_"}  # in-place ops that overwrite their first argument without reading it
REPEATS = 5  # timed repeats of each machine measurement, after one untimed
BANDWIDTH_SIZES = (16, 29)  # log2 of the bytes an element-wise op moves, smallest and largest measured


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.step_roofline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="model (default: %(default)s)")
    parser.add_argument("--length", type=int, default=160,
                        help="tokens per window (default: %(default)s, the preset's median window rounded up to its buckets)")
    parser.add_argument("--steps", type=int, default=3, help="steps measured, after two unmeasured (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file (default: %(default)s)")
    return parser.parse_args(argv)


def tensors(value):
    """The tensors in an op's argument or result (a tensor, a list of them, or neither)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, torch.Tensor)]
    return []


def nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in values)


class OpMeter:
    """A ``TorchDispatchMode`` factory: every op's seconds, bytes moved and FLOPs, by op name, and the
    shapes and dtypes the matmuls took."""

    def __init__(self):
        self.ops = defaultdict(lambda: {"calls": 0, "seconds": 0.0, "bytes": 0, "flops": 0, "sizes": []})
        self.matmul_shapes = set()

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                started = time.perf_counter()
                out = func(*args, **kwargs)
                meter.record(func, args, kwargs, out, time.perf_counter() - started)
                return out

        return Mode()

    def record(self, func, args, kwargs, out, seconds: float) -> None:
        schema, name = func._schema, func._schema.name.removeprefix("aten::")
        op = self.ops[name]
        op["calls"] += 1
        op["seconds"] += seconds
        if name in MATMULS:
            a, b = args[-2], args[-1]  # addmm / baddbmm take the added tensor first
            op["flops"] += matmul_flops(a.shape, b.shape)
            self.matmul_shapes.add((tuple(a.shape), tuple(b.shape), a.dtype))
            return
        returns_views = bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                                     for r in schema.returns)
        if returns_views or name.startswith("empty"):
            return  # a view, or memory not yet written: nothing moves
        given = {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}
        moved = 0
        for position, spec in enumerate(schema.arguments):
            values = tensors(given.get(spec.name))
            writes = spec.alias_info is not None and spec.alias_info.is_write
            reads = not spec.is_out and not (position == 0 and name in NOT_READ)
            moved += nbytes(values) * (reads + writes)
        if not any(r.alias_info is not None for r in schema.returns):
            moved += nbytes(tensors(out))  # new tensors it wrote
        op["bytes"] += moved
        op["sizes"].append(moved)


def matmul_flops(a_shape, b_shape) -> int:
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1] * (a_shape[0] if len(a_shape) == 3 else 1)


def measure_step(args) -> dict:
    """One step's ops (mean over ``--steps``) and its un-instrumented wall time."""
    config = preset_config()
    model, train = preset_training(args.model, 1000, cheap_dropout=True, max_tokens=config.max_batch_tokens)
    batch = lambda: step_inputs(model, args.length, config.per_device_batch_size)
    for _ in range(2):
        train(batch())
    started = time.perf_counter()
    for _ in range(args.steps):
        train(batch())
    step_s = (time.perf_counter() - started) / args.steps
    meter = OpMeter()
    with meter.mode():
        for _ in range(args.steps):
            train(batch())
    ops = {name: {**{k: op[k] / args.steps for k in ("calls", "seconds", "bytes", "flops")}, "sizes": op["sizes"]}
           for name, op in meter.ops.items()}
    return {"step_s": step_s, "windows": config.per_device_batch_size, "ops": ops, "matmul_shapes": meter.matmul_shapes}


def time_op(function) -> float:
    function()
    started = time.perf_counter()
    for _ in range(REPEATS):
        function()
    return (time.perf_counter() - started) / REPEATS


def bandwidth_gb_s(size_bytes: int) -> float:
    """GB/s of ``torch.add(a, b, out=c)`` moving ``size_bytes`` over three float32 tensors."""
    import torch

    a, b, c = (torch.ones(max(1, size_bytes // 12)) for _ in range(3))
    return 3 * a.numel() * 4 / time_op(lambda: torch.add(a, b, out=c)) / 1e9


def bandwidth_curve() -> dict[int, float]:
    """:func:`bandwidth_gb_s` at powers of two from 64 KiB (in a core's cache) to 512 MiB (memory)."""
    return {2**k: bandwidth_gb_s(2**k) for k in range(BANDWIDTH_SIZES[0], BANDWIDTH_SIZES[1] + 1)}


def floor_seconds(sizes: list[int], curve: dict[int, float]) -> float:
    """Seconds to move each op call's bytes at the machine's bandwidth for an op of that size (the
    curve's next size up; no slower than the largest)."""
    points = sorted(curve)
    return sum(size / (curve[next((p for p in points if p >= size), points[-1])] * 1e9) for size in sizes)


def matmul_rate(shapes: set) -> dict:
    """GFLOP/s of the step's matmuls, each shape timed alone in the dtype the step multiplied it in (bf16
    under autocast; float32 where the step computes in float32, as its attention does)."""
    import torch

    flops = seconds = 0.0
    for a_shape, b_shape, dtype in sorted(shapes, key=str):
        a, b = torch.randn(a_shape, dtype=dtype), torch.randn(b_shape, dtype=dtype)
        multiply = torch.bmm if len(a_shape) == 3 else torch.mm
        seconds += time_op(lambda: multiply(a, b))
        flops += matmul_flops(a_shape, b_shape)
    return {"dtypes": sorted({str(d).removeprefix("torch.") for *_, d in shapes}), "shapes": len(shapes),
            "gflop_per_s": flops / seconds / 1e9}


def main(argv=None) -> int:
    args = parse_args(argv)
    return benchlib.run_in_workdir(measure, args, prefix="bench-roofline-")


def measure(args, workdir: Path, load_before: list[float]) -> int:
    benchlib.quiet_libraries()
    step = measure_step(args)
    ops = step["ops"]
    matmul = {k: sum(op[k] for name, op in ops.items() if name in MATMULS) for k in ("seconds", "flops")}
    other = {k: sum(op[k] for name, op in ops.items() if name not in MATMULS) for k in ("seconds", "bytes")}
    curve = bandwidth_curve()
    machine = {"matmul": matmul_rate(step.pop("matmul_shapes")), "bandwidth_gb_s_by_bytes": curve}
    for op in ops.values():  # a matmul recorded no sizes: its floor is its FLOPs at the matmul rate
        op["floor_seconds"] = floor_seconds(op.pop("sizes"), curve) / args.steps
    floor_matmul = matmul["flops"] / (machine["matmul"]["gflop_per_s"] * 1e9)
    floor_other = sum(op["floor_seconds"] for op in ops.values())
    ratios = {
        "step_share_of_matmul_rate": floor_matmul / step["step_s"],
        "matmul_share_of_op_seconds": matmul["seconds"] / (matmul["seconds"] + other["seconds"]),
        "loop_matmuls_share_of_matmul_rate": floor_matmul / matmul["seconds"],
        "other_ops_share_of_bandwidth": floor_other / other["seconds"],
        "best_share_without_fusion": floor_matmul / (floor_matmul + floor_other),
    }
    top = sorted(((name, op) for name, op in ops.items() if name not in MATMULS), key=lambda item: -item[1]["seconds"])
    rows = [{"op": name, "calls": op["calls"], "ms": op["seconds"] * 1e3, "MB": op["bytes"] / 1e6,
             "GB/s": op["bytes"] / op["seconds"] / 1e9 if op["seconds"] else 0.0, "floor ms": op["floor_seconds"] * 1e3,
             "share_of_step_op_time": op["seconds"] / (matmul["seconds"] + other["seconds"])} for name, op in top[:15]]
    summary = [
        {"part": "matmuls", "ms": matmul["seconds"] * 1e3, "work": f"{matmul['flops'] / 1e9:.1f} GFLOP",
         "achieved": f"{matmul['flops'] / matmul['seconds'] / 1e9:.0f} GFLOP/s",
         "machine": f"{machine['matmul']['gflop_per_s']:.0f} GFLOP/s", "floor ms": floor_matmul * 1e3},
        {"part": "everything else", "ms": other["seconds"] * 1e3, "work": f"{other['bytes'] / 1e9:.2f} GB",
         "achieved": f"{other['bytes'] / other['seconds'] / 1e9:.1f} GB/s",
         "machine": f"{min(curve.values()):.0f}-{max(curve.values()):.0f} GB/s by size",
         "floor ms": floor_other * 1e3},
    ]
    title = f"One preset step, {step['windows']} windows of {args.length} tokens ({step['step_s'] * 1e3:.0f} ms uninstrumented)"
    benchlib.print_table(title, summary, ["part", "ms", "work", "achieved", "machine", "floor ms"])
    benchlib.print_table("The slowest other ops", rows, ["op", "calls", "ms", "MB", "GB/s", "floor ms", "share_of_step_op_time"])
    benchlib.print_table("Ratios", [{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"])
    benchlib.print_table("The machine's element-wise bandwidth (torch.add)",
                         [{"bytes moved": f"{size / 2**20:g} MiB", "GB/s": gb_s} for size, gb_s in curve.items()],
                         ["bytes moved", "GB/s"])
    benchlib.write_json(args.out, "step_roofline", ratios,
                        {"step_s": step["step_s"], "matmul": matmul, "other": other, "machine": machine,
                         "slowest_other_ops": rows, "ops": ops},
                        {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                         "max_batch_tokens": preset_config().max_batch_tokens}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
