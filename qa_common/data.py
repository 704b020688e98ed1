"""Readers for SQuAD-format question answering data.

Every reader returns a list of flat records, the column layout of the Hugging Face ``squad`` and
``squad_v2`` datasets::

    {"id": str, "title": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]}}

SQuAD 2.0 data is accepted everywhere: an unanswerable question has empty ``answers`` (and may say
``"is_impossible": true``, as the official v2.0 files do; their ``plausible_answers`` are ignored).

A record may also name a ``"group"`` (a string): records sharing one are one question read over
several passages (``python -m library_job mine`` writes them; ``train_job --shared-normalization``
normalises their windows together). The field is kept only where present.

Accepted files (optionally gzipped: ``.json.gz``, ``.jsonl.gz``):

- the official nested JSON, ``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``;
- flat JSON, a list of records or ``{"data": [records]}``;
- JSON Lines, one record per line;
- Parquet with the record columns.

Each record is validated; a bad file raises :class:`SquadFormatError` naming the file, the record and
the problem.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")


class SquadFormatError(ValueError):
    """A data file is not valid SQuAD-format data."""


def read_squad(path: str | Path, *, require_answers: bool = True) -> list[dict]:
    """Read and validate one SQuAD-format file (format chosen by its suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        raw = _jsonl_records(path)
    elif name.endswith((".json", ".json.gz")):
        raw = _json_records(path)
    elif name.endswith(".parquet"):
        raw = _parquet_records(path)
    else:
        raise SquadFormatError(f"{path}: unknown data format; expected one of {', '.join(SUFFIXES)}")
    return validate_records(raw, source=str(path), require_answers=require_answers)


def load_hub_squad(name: str, split: str, *, require_answers: bool = True) -> list[dict]:
    """Load one split of a SQuAD-format data set from the Hugging Face Hub (or its local cache)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # the Hub raises many kinds: offline, not found, gated, bad split
        raise SquadFormatError(
            f"could not load split {split!r} of data set {name!r} from the Hugging Face Hub or its cache "
            f"({type(error).__name__}: {error}); offline, pass local files instead"
        ) from error
    return validate_records(dataset, source=f"{name}[{split}]", require_answers=require_answers)


def validate_records(
    records: Iterable[tuple[str, Any]] | Iterable[Any], *, source: str, require_answers: bool = True
) -> list[dict]:
    """Check and normalise records; ``records`` yields records or ``(where, record)`` pairs.

    With ``require_answers`` every record needs an ``answers`` field, which is empty for an
    unanswerable (SQuAD 2.0) question; without it, records may omit the field (questions to answer).
    """
    validated, seen_ids = [], set()
    for index, item in enumerate(records):
        where, record = item if isinstance(item, tuple) else (f"record {index}", item)
        record = _validate_record(record, f"{source}: {where}", require_answers)
        if record["id"] in seen_ids:
            raise SquadFormatError(f"{source}: {where}: duplicate id {record['id']!r}")
        seen_ids.add(record["id"])
        validated.append(record)
    if not validated:
        raise SquadFormatError(f"{source}: holds no question records")
    return validated


def _validate_record(record: Any, where: str, require_answers: bool) -> dict:
    if not isinstance(record, dict):
        raise SquadFormatError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [key for key in ("id", "context", "question") if key not in record]
    if require_answers and record.get("answers") is None and record.get("is_impossible") is not True:
        missing.append("answers")
    if missing:
        raise SquadFormatError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in ("id", "context", "question"):
        if not isinstance(record[key], str):
            raise SquadFormatError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    where = f"{where} (id {record['id']!r})"
    if not record["context"].strip():
        raise SquadFormatError(f"{where}: empty context")
    if not record["question"].strip():
        raise SquadFormatError(f"{where}: empty question")
    texts, starts = _answer_lists(record.get("answers") or {"text": [], "answer_start": []}, where)
    impossible = record.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise SquadFormatError(f"{where}: 'is_impossible' must be true or false, got {type(impossible).__name__}")
    if impossible and texts:
        raise SquadFormatError(f"{where}: 'is_impossible' is true but the question has answers")
    context = record["context"]
    for text, start in zip(texts, starts):
        if context[start : start + len(text)] != text:
            # Offsets and sizes only: records may hold patient text, and this message reaches job logs.
            found = context.find(text)
            hint = f"; the text occurs at {found}" if found >= 0 else "; the text does not occur in the context"
            raise SquadFormatError(
                f"{where}: the answer ({len(text)} characters) does not match the context at answer_start "
                f"{start}{hint}"
            )
    validated = {
        "id": record["id"],
        "title": str(record.get("title") or ""),
        "context": context,
        "question": record["question"],
        "answers": {"text": texts, "answer_start": starts},
    }
    if record.get("group") is not None:
        if not isinstance(record["group"], str) or not record["group"]:
            raise SquadFormatError(f"{where}: 'group' must be a non-empty string")
        validated["group"] = record["group"]
    return validated


def _answer_lists(answers: Any, where: str) -> tuple[list[str], list[int]]:
    """Accept ``{"text": [...], "answer_start": [...]}`` and the official ``[{"text", "answer_start"}]``."""
    if isinstance(answers, list):
        if not all(isinstance(a, dict) and {"text", "answer_start"} <= a.keys() for a in answers):
            raise SquadFormatError(f"{where}: each answer needs 'text' and 'answer_start'")
        texts, starts = [a["text"] for a in answers], [a["answer_start"] for a in answers]
    elif isinstance(answers, dict) and {"text", "answer_start"} <= answers.keys():
        texts, starts = list(answers["text"]), list(answers["answer_start"])
    else:
        raise SquadFormatError(f"{where}: 'answers' must be {{'text': [...], 'answer_start': [...]}}")
    if len(texts) != len(starts):
        raise SquadFormatError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    if not all(isinstance(t, str) and t for t in texts):
        raise SquadFormatError(f"{where}: answer texts must be non-empty strings")
    # Parquet and numpy give integer-valued numpy scalars; bools and floats are mistakes.
    if not all(hasattr(s, "__index__") and not isinstance(s, bool) and int(s) >= 0 for s in starts):
        raise SquadFormatError(f"{where}: answer_start values must be non-negative integers, got {starts!r}")
    return texts, [int(s) for s in starts]


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(path) as file:
            document = json.load(file)
    except UnicodeDecodeError as error:
        raise SquadFormatError(f"{path}: not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise SquadFormatError(f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}")
    items = document.get("data") if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise SquadFormatError(f"{path}: expected a list of records or an object with a 'data' list")
    if items and isinstance(items[0], dict) and "paragraphs" in items[0]:
        return _nested_records(items, path)
    return ((f"record {i}", record) for i, record in enumerate(items))


def _nested_records(articles: list, path: Path) -> Iterator[tuple[str, Any]]:
    """Flatten the official layout: data[a].paragraphs[p].qas[q]."""
    for a, article in enumerate(articles):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise SquadFormatError(f"{path}: data[{a}]: an article needs a 'paragraphs' list")
        for p, paragraph in enumerate(article["paragraphs"]):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or "context" not in paragraph or "qas" not in paragraph:
                raise SquadFormatError(f"{path}: {where}: a paragraph needs 'context' and 'qas'")
            for q, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, dict):
                    raise SquadFormatError(f"{path}: {where}.qas[{q}]: expected an object")
                record = {"title": article.get("title", ""), "context": paragraph["context"], **qa}
                yield f"{where}.qas[{q}]", record


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open_text(path) as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise SquadFormatError(f"{path}: line {number}: malformed JSON: {error.msg}") from None
    except UnicodeDecodeError as error:
        raise SquadFormatError(f"{path}: not UTF-8 text ({error})") from error


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise SquadFormatError(f"{path}: not a readable Parquet file ({error})") from error
    return ((f"row {i}", record) for i, record in enumerate(table.to_pylist()))
