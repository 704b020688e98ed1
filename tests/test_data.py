import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURES
from qa_common import SquadFormatError, read_squad

NESTED = FIXTURES / "tiny-squad.json"
FLAT = FIXTURES / "tiny-squad.jsonl"


def test_nested_and_flat_files_give_the_same_records():
    nested, flat = read_squad(NESTED), read_squad(FLAT)
    assert nested == flat
    assert len(nested) == 13
    first = nested[0]
    assert set(first) == {"id", "title", "context", "question", "answers"}
    assert first["title"] == "Hand hygiene"
    text, start = first["answers"]["text"][0], first["answers"]["answer_start"][0]
    assert first["context"][start : start + len(text)] == text


def test_flat_json_parquet_and_gzip(tmp_path):
    records = read_squad(FLAT)
    (tmp_path / "flat.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    with gzip.open(tmp_path / "data.jsonl.gz", "wt") as file:
        file.write(FLAT.read_text())
    for name in ("flat.json", "wrapped.json", "data.parquet", "data.jsonl.gz"):
        assert read_squad(tmp_path / name) == records, name


def _write(tmp_path, name, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _line(**changes):
    record = {"id": "x1", "title": "t", "context": "The INR is 2.5.", "question": "What is the INR?",
              "answers": {"text": ["2.5"], "answer_start": [11]}}
    record.update(changes)
    return json.dumps({k: v for k, v in record.items() if v is not None}) + "\n"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.json", '{"data": [', "malformed JSON at line 1"),
        ("bad.jsonl", _line() + "{not json}\n", "line 2: malformed JSON"),
        ("bad.jsonl", b"\xff\xfe not utf-8", "not UTF-8"),
        ("bad.jsonl", _line(question=None), r"line 1: missing field\(s\) question"),
        ("bad.jsonl", _line(context=7), "field 'context' must be a string"),
        ("bad.jsonl", _line(context="   "), "empty context"),
        ("bad.jsonl", _line(answers={"text": ["2.5"], "answer_start": [3]}), "does not match the context at answer_start 3.*occurs at 11"),
        ("bad.jsonl", _line(answers={"text": ["9.9"], "answer_start": [0]}), "does not occur in the context"),
        ("bad.jsonl", _line(answers={"text": ["2.5"], "answer_start": ["11"]}), "non-negative integers"),
        ("bad.jsonl", _line(is_impossible=True), "'is_impossible' is true but the question has answers"),
        ("bad.jsonl", _line(is_impossible="yes"), "'is_impossible' must be true or false"),
        ("bad.jsonl", _line(answers={"text": ["2.5"]}), "'answers' must be"),
        ("bad.jsonl", _line() + _line(), "line 2: duplicate id 'x1'"),
        ("bad.jsonl", "\n", "holds no question records"),
        ("bad.json", '{"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}', r"data\[0\].paragraphs\[0\]: a paragraph needs"),
        ("bad.json", '{"rows": []}', "expected a list of records"),
        ("bad.csv", "id,context\n", "unknown data format"),
        ("bad.parquet", b"PAR1 broken", "not a readable Parquet file"),
    ],
)
def test_bad_files_give_an_error_naming_file_record_and_problem(tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(SquadFormatError, match=message) as error:
        read_squad(path)
    assert str(path) in str(error.value)


def test_the_failing_record_is_named_in_nested_files(tmp_path):
    document = json.loads(NESTED.read_text())
    document["data"][1]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] = 0
    path = _write(tmp_path, "nested.json", json.dumps(document))
    with pytest.raises(SquadFormatError, match=r"data\[1\].paragraphs\[0\].qas\[2\] \(id 'wa-3'\)"):
        read_squad(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_squad(FIXTURES / "nope.json")


def test_questions_without_answers_can_be_read_for_inference(tmp_path):
    path = _write(tmp_path, "questions.jsonl", _line(answers=None))
    records = read_squad(path, require_answers=False)
    assert records[0]["answers"] == {"text": [], "answer_start": []}


V2 = FIXTURES / "tiny-squad-v2.json"


def test_squad_v2_unanswerable_questions_in_every_format(tmp_path):
    records = read_squad(V2)
    unanswerable = [r for r in records if not r["answers"]["text"]]
    assert len(records) == 18 and len(unanswerable) == 5
    assert all(r["answers"] == {"text": [], "answer_start": []} for r in unanswerable)
    # The official v2.0 layout marks them is_impossible (with plausible_answers, ignored); flat files
    # may have only the empty answers, or only is_impossible.
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    only_flag = [{k: v for k, v in r.items() if k != "answers" or r["answers"]["text"]}
                 | ({} if r["answers"]["text"] else {"is_impossible": True}) for r in records]
    (tmp_path / "flag.json").write_text(json.dumps({"data": only_flag}))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data.parquet")
    with gzip.open(tmp_path / "data.json.gz", "wt") as file:
        file.write(V2.read_text())
    for name in ("flat.jsonl", "flag.json", "data.parquet", "data.json.gz"):
        assert read_squad(tmp_path / name) == records, name
