"""Input side of ``python -m train_job.predict``: find the data files, check them, read them with Ray Data.

The driver never reads a JSON Lines or Parquet file whole: it opens each file, checks its first
:data:`HEAD_RECORDS` records (or its Parquet schema and first rows) and hands the paths to Ray Data,
whose read tasks stream the records to the answering actors. Those check every record again
(:func:`validate_rows`), so a bad record further down still fails the job naming file and id.

A JSON document (the official nested SQuAD layout, or a flat list) is one value that must be parsed
whole, so the driver reads and validates it with :func:`qa_common.read_squad` and passes its records
to Ray Data in blocks: its driver memory grows with the file (about 2x its size). Convert big inputs
to JSON Lines or Parquet to keep the driver's memory flat.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import os
from dataclasses import dataclass

from qa_common import SquadFormatError, read_squad, validate_records
from qa_common.data import SUFFIXES

HEAD_RECORDS = 1000  # records of each streamed file checked on the driver before any actor starts
QUESTION_COLUMNS = ["id", "question", "context"]
PATH_COLUMN = "path"  # the file each row came from, for error messages


GZIP_RATIO = 4  # a guess of how much gzip shrinks JSON Lines, to estimate a .gz file's records


@dataclass(frozen=True)
class InputFile:
    path: str  # a local absolute path or a URI
    has_answers: bool  # its (first) records carry gold answers
    records: int  # exact for JSON documents and Parquet; estimated from the first records for JSON Lines


def resolve_inputs(patterns: list[str]) -> list[str]:
    """The data files named by paths, globs, directories and URIs (``s3://``, ``gs://``, ``file://``), in order.

    A directory gives its files with a data suffix (not recursive); URIs take no glob characters.
    """
    files = []
    for pattern in patterns:
        if "://" in pattern:
            found = _uri_files(pattern)
        else:
            pattern = os.path.expanduser(pattern)
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            found = []
            for match in matches:
                if os.path.isdir(match):
                    found += sorted(os.path.join(match, n) for n in os.listdir(match) if _is_data_file(n))
                elif os.path.isfile(match):
                    found.append(os.path.abspath(match))
        if not found:
            raise FileNotFoundError(f"{pattern}: no such data file (or no data file in that directory or glob)")
        files += found
    for path in files:
        if not _is_data_file(path):
            raise SquadFormatError(f"{path}: unknown data format; expected one of {', '.join(SUFFIXES)}")
    return list(dict.fromkeys(files))


def _is_data_file(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def _uri_files(uri: str) -> list[str]:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == pyarrow.fs.FileType.File:
        return [uri]
    if info.type == pyarrow.fs.FileType.Directory:
        entries = filesystem.get_file_info(pyarrow.fs.FileSelector(path))
        return sorted(uri.rstrip("/") + "/" + e.base_name for e in entries
                      if e.type == pyarrow.fs.FileType.File and _is_data_file(e.base_name))
    return []


def _filesystem(path: str):
    """``(pyarrow filesystem, path in it)`` of a local path or URI."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), path


def is_json_document(path: str) -> bool:
    return path.lower().endswith((".json", ".json.gz"))


def check_input(path: str) -> InputFile:
    """Check a file's first records (all of a JSON document); SquadFormatError names file, record and problem."""
    if is_json_document(path):
        if "://" in path:
            raise SquadFormatError(f"{path}: a JSON document is read by the driver and must be a local path; "
                                   "convert it to JSON Lines or Parquet to read it from a URI")
        records = read_squad(path, require_answers=False)
        count = len(records)
    elif path.lower().endswith(".parquet"):
        records, count = _parquet_head(path)
    else:
        records, count = _jsonl_head(path)
    return InputFile(path, has_answers=any(record["answers"]["text"] for record in records), records=count)


def _jsonl_head(path: str) -> tuple[list[dict], int]:
    """The first records, validated, and an estimate of the file's records from their size."""
    def numbered_records(lines):
        for number, line in lines:
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise SquadFormatError(f"{path}: line {number}: malformed JSON") from None

    head_bytes = 0

    def counted(lines):
        nonlocal head_bytes
        for line in lines:
            head_bytes += len(line.encode("utf-8"))
            yield line

    filesystem, inner = _filesystem(path)
    gzipped = path.lower().endswith(".gz")
    try:
        stream = filesystem.open_input_stream(inner, compression="gzip" if gzipped else None)
        with io.TextIOWrapper(stream, encoding="utf-8") as text:
            pairs = list(itertools.islice(numbered_records(enumerate(counted(text), start=1)), HEAD_RECORDS))
    except UnicodeDecodeError as error:
        raise SquadFormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = validate_records(pairs, source=path, require_answers=False)
    size = filesystem.get_file_info(inner).size * (GZIP_RATIO if gzipped else 1)
    return records, max(len(records), round(size * len(records) / max(head_bytes, 1)))


def _parquet_head(path: str) -> tuple[list[dict], int]:
    import pyarrow.parquet as pq

    try:
        filesystem, inner = _filesystem(path)
        file = pq.ParquetFile(filesystem.open_input_file(inner))
        missing = [column for column in QUESTION_COLUMNS if column not in file.schema_arrow.names]
        if missing:
            raise SquadFormatError(f"{path}: missing column(s) {', '.join(missing)}")
        batch = next(file.iter_batches(batch_size=HEAD_RECORDS), None)
    except (OSError, ValueError) as error:
        if isinstance(error, SquadFormatError):
            raise
        raise SquadFormatError(f"{path}: not a readable Parquet file ({type(error).__name__})") from None
    rows = batch.to_pylist() if batch is not None else []
    records = validate_records([(f"row {i}", row) for i, row in enumerate(rows)], source=path, require_answers=False)
    return records, file.metadata.num_rows


def question_dataset(inputs: list[InputFile], *, with_answers: bool, rows_per_block: int):
    """One Ray Dataset of the question rows of every input (``path``, ``id``, ``question``, ``context``
    and, ``with_answers``, ``answers``), streamed from the files where the format allows it.

    An actor answers a whole block in one task, so blocks hold about ``rows_per_block`` questions:
    every actor gets work and answers flow out as they come. The reads are told how many blocks
    to cut (Ray Data splits each file's records); a repartition would run tasks that need a CPU,
    which the actors may all hold.
    """
    import ray.data

    def blocks(files: list[InputFile]) -> int:
        return max(1, -(-sum(f.records for f in files) // rows_per_block))

    columns = QUESTION_COLUMNS + (["answers"] if with_answers else [])
    parts = []
    documents = [f.path for f in inputs if is_json_document(f.path)]
    for path in documents:
        records = read_squad(path, require_answers=False)
        rows = [{PATH_COLUMN: path, **{column: record[column] for column in columns}} for record in records]
        parts.append(ray.data.from_items(rows, override_num_blocks=-(-len(rows) // rows_per_block)))
    # Reading takes no CPU of its own: the actors may hold every CPU of a small machine.
    parquet = [f for f in inputs if f.path.lower().endswith(".parquet")]
    if parquet:
        parts.append(ray.data.read_parquet([f.path for f in parquet], columns=columns, include_paths=True,
                                           num_cpus=0, override_num_blocks=blocks(parquet)))
    lines = [f for f in inputs if f.path.lower().endswith((".jsonl", ".jsonl.gz"))]
    if lines:
        parts.append(ray.data.read_json([f.path for f in lines], include_paths=True, file_extensions=None,
                                        num_cpus=0, override_num_blocks=blocks(lines)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def validate_rows(rows: list[dict]) -> list[dict]:
    """Validate the rows of one batch (per file they came from); SquadFormatError names file and id.

    Arrow gives a field that a record lacks as None: such fields count as absent, so a record
    without ``answers`` reads as having none, as in :func:`qa_common.read_squad`.
    """
    by_path = {}
    for row in rows:
        by_path.setdefault(row.get(PATH_COLUMN), []).append({k: v for k, v in row.items() if v is not None})
    records = []
    for path, group in by_path.items():
        records += validate_records([("record", row) for row in group], source=str(path), require_answers=False)
    return records
