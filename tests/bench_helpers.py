"""What every bench script's result must hold, for the bench smoke tests, and how they run one."""

import importlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON_KEYS = {"benchmark", "ratios", "results", "settings", "machine", "load_average", "command", "finished_at"}


def check_document(out: Path, printed: str) -> dict:
    """The result file's common shape, and the printed table of ratios."""
    document = json.loads(out.read_text(encoding="utf-8"))
    assert COMMON_KEYS <= document.keys()
    assert list(document)[:2] == ["benchmark", "ratios"]  # ratios first
    assert document["machine"]["nproc"] >= 1 and document["machine"]["torch"]
    assert "Ratios" in printed  # the printed table
    return document


def run_bench(script: str, out: Path, capsys, *flags: str) -> dict:
    """``python -m bench.<script> --out OUT FLAGS`` in this process, on the session's Ray."""
    import ray

    running = ray.is_initialized()
    assert importlib.import_module(f"bench.{script}").main(["--out", str(out), *flags]) == 0
    assert ray.is_initialized() == running  # a Ray the caller runs is left running, and no other is left behind
    return check_document(out, capsys.readouterr().out)
