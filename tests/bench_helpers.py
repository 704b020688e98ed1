"""What every bench script's result must hold, for the bench smoke tests."""

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
