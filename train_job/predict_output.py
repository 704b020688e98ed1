"""Where ``python -m train_job.predict`` writes: the answers streamed one block at a time into
``predictions.<format>``, and with gold answers ``predictions.json`` and the summed metrics.

The actors add each question's scores as ``gold_*`` columns (:data:`SCORE_PREFIX`); the writer sums
them and leaves them out of the predictions. An actor that finds a bad record answers with the one
column :data:`DATA_ERROR` instead: Ray would hand the driver the exception as text only, and the
driver must tell bad data (exit 2) from a failure.
"""

from __future__ import annotations

import json
import os

from qa_common import SquadFormatError
from qa_common.metric import V1_NAMES, MetricTotals
from train_job import run_dir

SCORE_PREFIX = "gold_"
SCORE_NAMES = (*V1_NAMES, "v2_exact", "v2_f1")  # qa_common.metric.question_scores
ANSWERABLE = SCORE_PREFIX + "answerable"
DATA_ERROR = "data_error"
FORMATS = ("jsonl", "parquet")


def output_directory(output: str):
    """``(pyarrow filesystem, directory)`` of a local directory or URI (``s3://...``), created if need be."""
    import pyarrow.fs

    filesystem, directory = (pyarrow.fs.FileSystem.from_uri(output) if "://" in output
                             else (pyarrow.fs.LocalFileSystem(), os.path.abspath(output)))
    filesystem.create_dir(directory, recursive=True)
    return filesystem, directory


class OutputWriter:
    """Streams answer blocks to ``predictions.<format>`` and, with gold answers, ``predictions.json``
    and the metric sums, in ``directory`` of ``filesystem``."""

    def __init__(self, filesystem, directory: str, fmt: str, with_answers: bool):
        self.filesystem, self.directory = filesystem, directory
        self.fmt, self.with_answers = fmt, with_answers
        self.files = [f"predictions.{fmt}"] + ([run_dir.PREDICTIONS] if with_answers else [])
        self.stream = self._open(self.files[0])
        self.parquet = None
        self.answers_json = self._open(run_dir.PREDICTIONS) if with_answers else None
        self.questions = 0
        self.ids: set[str] = set()
        self.totals = MetricTotals()

    def _open(self, name: str):
        return self.filesystem.open_output_stream(f"{self.directory}/{name}")

    def location(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def write(self, block) -> None:
        import pyarrow.parquet as pq

        if DATA_ERROR in block.column_names:
            raise SquadFormatError(block.column(DATA_ERROR)[0].as_py())
        if not block.num_rows:
            return
        for question_id in block.column("id").to_pylist():
            if question_id in self.ids:
                raise SquadFormatError(f"question id {question_id[:64]!r} occurs more than once in the input: "
                                       "ids must be unique across every file given")
            self.ids.add(question_id)
        scores = [name for name in block.column_names if name.startswith(SCORE_PREFIX)]
        predictions = block.drop_columns(scores)
        if self.fmt == "parquet":
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.stream, predictions.schema)
            self.parquet.write_table(predictions.cast(self.parquet.schema))
        else:
            self.stream.write("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                      for row in predictions.to_pylist()).encode("utf-8"))
        if self.with_answers:
            self._add_gold(block)
        self.questions += block.num_rows

    def _add_gold(self, block) -> None:
        separator = "{\n" if self.questions == 0 else ",\n"
        self.answers_json.write((separator + ",\n".join(
            f"{json.dumps(i, ensure_ascii=False)}: {json.dumps(a, ensure_ascii=False)}"
            for i, a in zip(block.column("id").to_pylist(), block.column("answer").to_pylist()))).encode("utf-8"))
        columns = {name: block.column(SCORE_PREFIX + name).to_pylist() for name in SCORE_NAMES}
        for row, answerable in enumerate(block.column(ANSWERABLE).to_pylist()):
            self.totals.add({name: columns[name][row] for name in SCORE_NAMES}, answerable=answerable)

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
        self.stream.close()
        if self.answers_json is not None:
            self.answers_json.write(("}\n" if self.questions else "{}\n").encode("utf-8"))
            self.answers_json.close()

    def discard(self) -> None:
        """Remove the files of a run that did not finish, so that what is there is always complete."""
        for name in self.files:
            self.filesystem.delete_file(self.location(name))

    def metrics(self) -> dict:
        """The SQuAD metrics in percent, as ``python -m qa_common.evaluate`` prints them: v1.1's, or
        v2.0's when some question has no gold answer."""
        return self.totals.metrics(version_2=bool(self.totals.sums["NoAns", "total"]))
