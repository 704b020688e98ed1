"""The document library: reading PDF/DOCX/HTML/Markdown/text, passages, the Ray Data index build
(unreadable files, incremental rebuilds, atomic versions) and hybrid search."""

import json
import shutil

import pyarrow as pa
import pytest
from library_helpers import ARTICLES, write_docx, write_library, write_pdf

from library_job import build as build_job
from library_job.__main__ import main as library_job
from qa_common.library.documents import Block, DocumentError, read_blocks
from qa_common.library.embedding import Embedder
from qa_common.library.index import (
    CURRENT_FILE, PASSAGE_COLUMNS, TABLE, VECTORS, LibraryError, is_indexed, read_manifest,
)
from qa_common.library.passages import sentence_spans, split_passages
from qa_common.library.search import Library


def test_pdf_pages_and_docx_headings_are_kept(tmp_path):
    write_pdf(tmp_path / "a.pdf", ["First page text.\n\nA second paragraph.", "Only on page two."])
    # A PDF's text layer has lines, not paragraphs: a page's text is one block (passages cut it at sentences).
    assert read_blocks(tmp_path / "a.pdf") == [Block("First page text. A second paragraph.", 1, ""),
                                               Block("Only on page two.", 2, "")]
    write_docx(tmp_path / "b.docx", "Dosing", ["Give 5 mg.", ""])
    assert read_blocks(tmp_path / "b.docx") == [Block("Give 5 mg.", None, "Dosing")]
    (tmp_path / "c.md").write_text("intro line\n# One\ntext one\n\n## Two\ntext\ntwo\n")
    assert read_blocks(tmp_path / "c.md") == [Block("intro line", None, ""), Block("text one", None, "One"),
                                              Block("text two", None, "Two")]
    (tmp_path / "d.html").write_text("<h1>Title</h1><script>var x;</script><p>Para &amp; more</p><ul><li>item</li></ul>")
    assert read_blocks(tmp_path / "d.html") == [Block("Para & more", None, "Title"), Block("item", None, "Title")]


@pytest.mark.parametrize("name, content, reason", [
    ("broken.pdf", b"%PDF-1.4 garbage", "could not be read as .pdf"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("empty.md", b"\n\n", "has no text"),
    ("notes.rtf", b"{\\rtf1}", "unsupported file type .rtf"),
])
def test_an_unreadable_document_says_why_without_quoting_it(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DocumentError, match=reason) as error:
        read_blocks(tmp_path / name)
    assert "garbage" not in str(error.value) and "caf" not in str(error.value)


def test_passages_keep_one_page_and_section_and_a_word_bound():
    long = " ".join(f"Sentence {i} has five words." for i in range(10))  # 50 words
    blocks = [Block("short a", 1, "S"), Block("short b", 1, "S"), Block(long, 1, "S"), Block("next page", 2, "S"),
              Block("other section", 2, "T")]
    passages = split_passages(blocks, max_words=20)
    assert passages[0].text == "short a\nshort b"
    assert all(len(p.text.split()) <= 20 for p in passages)
    assert " ".join(p.text for p in passages if p.page == 1).replace("\n", " ") == f"short a short b {long}"
    assert [(p.text, p.page, p.section) for p in passages[-2:]] == [("next page", 2, "S"), ("other section", 2, "T")]
    assert all(p.text.endswith(".") for p in passages[1:-2])  # cut at sentence ends
    # A passage's sentences (each gets a vector): cut after . ! ? ; : and between its blocks.
    text = "Dose: 5 mg. Twice daily!\nGive with food\n\nCheck the INR; stop if over 4"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "Dose:", "5 mg.", "Twice daily!", "Give with food", "Check the INR;", "stop if over 4"]
    assert sentence_spans("") == [] and sentence_spans("No end") == [(0, 6)]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def built(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    docs = write_library(root / "ward")
    return root, docs, root / "index"


def build(docs, index, capsys, *extra):
    code = library_job(["build", str(docs), "--library", str(index), "--concurrency", "1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_reports_an_unreadable_file_indexes_the_rest_and_cites_the_page(built, embedder, capsys):
    root, docs, index = built
    code, out, err = build(docs, index, capsys)
    assert code == 0
    # Counts and reasons on the console, never a document's name: those are in the report (0600).
    assert "1 file(s) left out: 1 could not be read as .pdf (" in err and "scan-0001" not in out + err
    report = index / "build-report.json"
    [entry] = json.loads(report.read_text())["left_out"]
    assert entry["document"] == "scan-0001.pdf" and entry["reason"].startswith("could not be read as .pdf (")
    assert report.stat().st_mode & 0o777 == 0o600 and index.stat().st_mode & 0o777 == 0o700
    assert (index / "CURRENT").stat().st_mode & 0o777 == 0o600
    manifest = read_manifest(index)
    assert manifest.summary() == [{"name": "ward", "documents": 4, "passages": 5}]
    assert sorted(doc.document for doc in manifest.documents.values()) == [
        "guides/dehydration.md", "hand-hygiene.pdf", "stroke.html", "warfarin.docx"]

    library = Library(index)
    question = "Why are soap and water preferred when hands are visibly dirty?"
    for mode in ("hybrid", "dense", "lexical"):
        [best] = library.search(question, embedder.embed([question])[0], 1, mode=mode)
        assert (best.passage["document"], best.passage["page"]) == ("hand-hygiene.pdf", 2), mode
        assert best.passage["text"] == ARTICLES["Hand hygiene"]
    question = "Which vitamin reduces the effect of warfarin?"
    [best] = library.search(question, embedder.embed([question])[0], 1)
    assert (best.passage["document"], best.passage["section"], best.passage["page"]) == ("warfarin.docx", "Warfarin", None)
    only = library.search(question, embedder.embed([question])[0], 5, document="stroke.html")
    assert {hit.passage["document"] for hit in only} == {"stroke.html"}
    assert library.search(question, embedder.embed([question])[0], 5, collection="elsewhere") == []
    # Passages by id (how feedback finds what an answer was read from), quotes and all.
    assert library.passages([best.passage["passage_id"], "gone-00001", "it's-00002"]) == [best.passage]


def test_a_rebuild_reads_only_changed_files_and_drops_deleted_ones(built, embedder, capsys):
    root, docs, index = built
    if not (index / CURRENT_FILE).exists():
        build(docs, index, capsys)
    first = read_manifest(index)
    library = Library(index)
    before = {hit.passage["passage_id"]: hit.passage for hit in library.search("x", embedder.embed(["x"])[0], 20,
                                                                                mode="dense")}
    assert build(docs, index, capsys)[1].count("up to date") == 1  # nothing changed: no new version

    (docs / "stroke.html").write_text("<p>Stroke units now give the drug within three hours.</p>")
    (docs / "guides" / "dehydration.md").unlink()
    code, out, _ = build(docs, index, capsys)
    assert code == 0
    assert "0 new, 1 changed, 3 unchanged), 1 removed" in out  # the broken PDF counts as unchanged
    assert "1 passages read and embedded" in out  # only the changed file was embedded
    second = read_manifest(index)
    assert second.version != first.version
    assert (index / first.version).is_dir()  # kept for readers that still have it open
    assert second.summary() == [{"name": "ward", "documents": 3, "passages": 4}]

    assert library.refresh() is True and library.version == second.version
    after = {hit.passage["passage_id"]: hit.passage for hit in library.search("x", embedder.embed(["x"])[0], 20,
                                                                               mode="dense")}
    unchanged = {pid: p for pid, p in before.items() if p["document"] in ("hand-hygiene.pdf", "warfarin.docx")}
    assert {pid: after[pid] for pid in unchanged} == unchanged  # same ids, same rows
    assert {p["document"] for p in after.values()} == {"hand-hygiene.pdf", "warfarin.docx", "stroke.html"}
    [best] = library.search("three hours", embedder.embed(["three hours"])[0], 1, mode="lexical")
    assert best.passage["text"] == "Stroke units now give the drug within three hours."

    # A rebuild that only drops a file copies the rest, embedding nothing; the file back is one new passage.
    text = (docs / "stroke.html").read_text()
    (docs / "stroke.html").unlink()
    code, out, _ = build(docs, index, capsys)
    assert code == 0 and "(0 new, 0 changed, 3 unchanged), 1 removed" in out and "0 passages read and embedded" in out
    assert library.refresh() is True and library.manifest.summary() == [{"name": "ward", "documents": 2, "passages": 3}]
    assert {hit.passage["document"] for hit in library.search("x", embedder.embed(["x"])[0], 20, mode="dense")} == {
        "hand-hygiene.pdf", "warfarin.docx"}
    (docs / "stroke.html").write_text(text)
    code, out, _ = build(docs, index, capsys)
    assert code == 0 and "(1 new, 0 changed, 3 unchanged), 0 removed" in out and "1 passages read and embedded" in out


def test_a_second_collection_is_kept_beside_the_first_and_bad_input_exits_2(built, capsys, tmp_path):
    root, docs, index = built
    if not (index / CURRENT_FILE).exists():
        build(docs, index, capsys)
    leaflets = tmp_path / "leaflets"
    leaflets.mkdir()
    (leaflets / "fluids.txt").write_text(ARTICLES["Dehydration in children"])
    assert build(leaflets, index, capsys)[0] == 0
    counts = {c["name"]: c["documents"] for c in read_manifest(index).summary()}
    assert counts["leaflets"] == 1 and counts["ward"] >= 3

    assert build(tmp_path / "missing", index, capsys)[0] == 2
    code, _, err = build(leaflets, index, capsys, "--collection", "bad name!")
    assert code == 2 and "collection name" in err
    with pytest.raises(SystemExit):
        library_job(["build", str(leaflets), "--library", str(index), "--max-passage-words", "0"])


def _fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("failing", ["writing the table", "writing the manifest", "switching CURRENT"])
def test_a_failed_build_leaves_the_served_version_alone(built, capsys, monkeypatch, failing):
    from qa_common.library import index as index_module

    root, docs, index = built
    if not (index / CURRENT_FILE).exists():
        build(docs, index, capsys)
    served = (index / CURRENT_FILE).read_text()
    before = sorted(p.name for p in index.iterdir())
    (docs / "warfarin-2.txt").write_text("A new leaflet about warfarin.")
    target = {"writing the table": (build_job, "write_table"), "writing the manifest": (index_module.Manifest, "to_json"),
              "switching CURRENT": (index_module.os, "replace")}[failing]
    monkeypatch.setattr(*target, _fail)
    with pytest.raises(OSError, match="disk full"):
        build(docs, index, capsys)
    monkeypatch.undo()
    assert (index / CURRENT_FILE).read_text() == served
    assert sorted(p.name for p in index.iterdir()) == before  # nothing half-written left behind
    (docs / "warfarin-2.txt").unlink()


def test_the_bundled_sample_library_reads_whole_and_cites_the_handbook_page(local_ray, embedder, tmp_path, capsys):
    from train_job.presets import DATA_DIR

    code, out, err = build(DATA_DIR / "library", tmp_path / "index", capsys)
    assert code == 0 and "could not be read" not in err
    [summary] = read_manifest(tmp_path / "index").summary()
    assert summary["name"] == "library" and summary["documents"] == 27
    question = "How long should hands be rubbed with alcohol gel?"
    [best] = Library(tmp_path / "index").search(question, embedder.embed([question])[0], 1)
    assert (best.passage["document"], best.passage["page"]) == ("ward-handbook.pdf", 4)
    assert "20 to 30 seconds" in best.passage["text"]


def test_a_passage_is_scored_by_its_best_vector_its_sentences_read_in_context(built, embedder, capsys, tiny_model_dir):
    import lancedb
    import numpy as np
    import torch

    root, docs, index = built
    if not (index / CURRENT_FILE).exists():
        build(docs, index, capsys)
    library = Library(index)
    rows = library.table.search().limit(None).select(["passage_id", "text", VECTORS]).to_list()
    stored = {row["passage_id"]: np.asarray(row[VECTORS], dtype=np.float32) for row in rows}
    for row in rows:  # the passage's own vector, then one per sentence
        assert len(stored[row["passage_id"]]) == 1 + len(sentence_spans(row["text"]))
        np.testing.assert_allclose(stored[row["passage_id"]][0], embedder.embed([row["text"]])[0], atol=1e-5)
    question = "What reverses warfarin?"
    vector = embedder.embed([question])[0]
    hits = library.search(question, vector, 20, mode="dense")
    assert len(hits) == len(rows)
    for hit in hits:
        assert hit.score == pytest.approx(float((stored[hit.passage["passage_id"]] @ vector).max()), abs=1e-5)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    # Through the vector index a build made (an exact search reads every vector from disk per question).
    assert {index.columns[0]: index.index_type for index in library.table.list_indices()}[VECTORS] == "IvfFlat"
    plan = library.table.search(vector, vector_column_name=VECTORS).distance_type("cosine").limit(3).explain_plan()
    assert "ANNSubIndex" in plan
    # A version without it (built by an earlier release) is copied into one with it, nothing embedded again.
    library.table.drop_index(f"{VECTORS}_idx")
    code, out, _ = build(docs, index, capsys)
    assert code == 0 and "up to date" not in out and "0 passages read and embedded" in out
    assert Library(index).version != library.version and is_indexed(Library(index).table)
    code, out, _ = build(docs, index, capsys)
    assert code == 0 and "up to date" in out

    # A sentence's vector is the passage's token states over its tokens: "It" read as warfarin.
    text = "Warfarin thins the blood. It is reversed with vitamin K."
    inputs = embedder.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = inputs.pop("offset_mapping")[0]
    with torch.inference_mode():
        hidden = embedder.model(**inputs).last_hidden_state[0]
    second = (offsets[:, 1] > 0) & (offsets[:, 0] >= text.index("It"))
    expected = torch.nn.functional.normalize(hidden[second].mean(0), dim=-1).numpy()
    [vectors] = embedder.embed_passages([text])
    assert vectors.shape == (3, embedder.dimension)
    np.testing.assert_allclose(vectors[2], expected, atol=1e-5)
    # A sentence past the embedder's cut has no vector.
    [cut] = embedder.embed_passages(["Short first. " + "word " * 300 + "end. Past the cut."])
    assert len(cut) == 3

    # A library built before passages had sentence vectors is refused with what to do, by search and build.
    old = root / "old-index"
    shutil.copytree(index, old)
    version = read_manifest(old).version
    table = lancedb.connect(str(old / version)).open_table(TABLE)
    kept = table.search().limit(None).select([*PASSAGE_COLUMNS, "sha256"]).to_arrow()
    passage_vectors = np.stack([stored[pid][0] for pid in kept.column("passage_id").to_pylist()])
    kept = kept.append_column("vector", pa.FixedSizeListArray.from_arrays(pa.array(passage_vectors.ravel()), 384))
    lancedb.connect(str(old / version)).create_table(TABLE, data=kept, mode="overwrite")
    with pytest.raises(LibraryError, match="earlier release, without sentence vectors: build the documents again"):
        Library(old)
    code, _, err = build(docs, old, capsys)
    assert code == 2 and "earlier release" in err
    from serve_app.app import MODEL_DEPLOYMENT, build_app

    with pytest.raises(LibraryError, match="earlier release"):  # python -m serve_app exits 2 with it
        build_app({"model": str(tiny_model_dir), "library": str(old)}, {MODEL_DEPLOYMENT: {"max_ongoing_requests": 32}})
