"""A library build is fed untrusted files and careless flags: no file stalls, kills or escapes it,
nothing outside the library's own folders is deleted, one build runs at a time, an empty (unmounted)
folder publishes nothing, and the switch to a new version is durable.

Each bomb is built small, with the limits turned down to match.
"""

import fcntl
import json
import os
import time

import pytest
from library_helpers import ARTICLES, write_docx, write_pdf

from library_job.__main__ import main as library_job
from qa_common.library.embedding import Embedder
from qa_common.library.index import CURRENT_FILE, LOCK_FILE, REPORT_FILE, VERSION_MARKER, read_manifest
from qa_common.library.search import Library

TIGHT = ["--max-pages", "3", "--max-seconds", "4", "--max-file-mb", "1", "--max-memory-mb", "64"]
GOOD = "good-leaflet.txt"


def write_docx_bomb(path, paragraphs: int = 10_000_000) -> None:
    """A 120 KB Word file whose XML holds ten million empty paragraphs (60 MB unzipped, gigabytes parsed)."""
    import zipfile

    write_docx(path.with_suffix(".base.docx"), "Bomb", ["x"])
    with zipfile.ZipFile(path.with_suffix(".base.docx")) as source, \
            zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "word/document.xml":
                head, tail = data.split(b"<w:body>")
                data = head + b"<w:body>" + b"<w:p/>" * paragraphs + tail
            bomb.writestr(item, data)
    path.with_suffix(".base.docx").unlink()


def build(docs, library, capsys, *extra):
    code = library_job(["build", str(docs), "--library", str(library), "--concurrency", "1", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    docs, outside = root / "ward", root / "elsewhere"
    docs.mkdir()
    outside.mkdir()
    (docs / GOOD).write_text(ARTICLES["Hand hygiene"])
    write_pdf(docs / "many-pages.pdf", [f"Page {n}." for n in range(5)])  # over --max-pages 3
    (docs / "quadratic.html").write_text("<p>" + "<a " * 16000)  # ~20 s in Python 3.11's html.parser
    with (docs / "sparse.txt").open("wb") as sparse:  # 3 GB on paper, nothing on disk: never read
        sparse.truncate(3 * 2**30)
    write_docx_bomb(docs / "bomb.docx")
    (outside / "secret.txt").write_text("The secret outside the library is Qwertzuiop.")
    (docs / "link.txt").symlink_to(outside / "secret.txt")
    (docs / "linked-folder").symlink_to(outside, target_is_directory=True)
    return root, docs, root / "library"


def test_every_bomb_is_left_out_with_the_limit_it_broke_and_the_rest_is_indexed(local_ray, bombs, capsys):
    root, docs, library = bombs
    started = time.monotonic()
    code, out, err = build(docs, library, capsys, *TIGHT)
    assert code == 0, err
    assert time.monotonic() - started < 120
    reasons = {entry["document"]: entry["reason"]
               for entry in json.loads((library / REPORT_FILE).read_text())["left_out"]}
    assert reasons["many-pages.pdf"] == "has 5 pages, more than 3 (--max-pages)"
    assert reasons["quadratic.html"] == "took longer than 4 s to read (--max-seconds)"
    assert reasons["sparse.txt"] == "is larger than 1 MB (--max-file-mb)"
    assert reasons["bomb.docx"] == "needs more than 64 MB of memory to read (--max-memory-mb)"
    assert reasons["link.txt"] == reasons["linked-folder"] == "is a link (links are not followed)"
    assert len(reasons) == 6 and "6 file(s) left out" in err
    assert not any(name in out + err for name in reasons)  # names stay in the report

    manifest = read_manifest(library)
    assert [doc.document for doc in manifest.documents.values()] == [GOOD]
    hits = Library(library).search("secret outside", Embedder().embed(["secret outside"])[0], 5)
    assert hits and all("Qwertzuiop" not in hit.passage["text"] for hit in hits)

    # Unchanged, they are not read again; changed, they are.
    code, out, err = build(docs, library, capsys, *TIGHT)
    assert code == 0 and "up to date" in out and "6 file(s) left out" in err
    (docs / "many-pages.pdf").unlink()
    write_pdf(docs / "many-pages.pdf", ["Now one page about gloves."])
    code, out, _ = build(docs, library, capsys, *TIGHT)
    assert code == 0 and "0 new, 1 changed" in out
    assert sorted(doc.document for doc in read_manifest(library).documents.values()) == [GOOD, "many-pages.pdf"]


def test_a_folder_that_is_not_a_library_is_refused_and_nothing_in_it_deleted(bombs, tmp_path, capsys):
    root, docs, _ = bombs
    projects = tmp_path / "projects"
    (projects / "thesis").mkdir(parents=True)
    (projects / "thesis" / "manifest.json").write_text("{}")
    (projects / "notes.txt").write_text("mine")
    code, _, err = build(docs, projects, capsys)
    assert code == 2 and "not a library's" in err and "nothing was written" in err
    assert sorted(p.name for p in projects.iterdir()) == ["notes.txt", "thesis"]
    code, _, err = build(docs, docs / "library", capsys)
    assert code == 2 and "separate folders" in err


def test_one_build_at_a_time_and_an_empty_folder_publishes_nothing(bombs, tmp_path, capsys):
    root, docs, library = bombs
    library.mkdir(exist_ok=True)
    descriptor = os.open(library / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another build is running
        code, _, err = build(docs, library, capsys)
        assert code == 2 and "another build" in err
    finally:
        os.close(descriptor)
    served = sorted(p.name for p in library.iterdir())
    unmounted = tmp_path / "ward"  # the collection's name, with nothing in it
    unmounted.mkdir()
    code, _, err = build(unmounted, library, capsys)
    assert code == 2 and "holds no documents" in err and "--allow-empty" in err
    assert sorted(p.name for p in library.iterdir()) == served


def test_a_killed_builds_leftovers_are_removed_and_the_switch_is_durable(local_ray, bombs, capsys, monkeypatch):
    root, docs, library = bombs
    orphan = library / "v20260101T000000000000Z"  # a build killed before it published
    orphan.mkdir()
    (orphan / VERSION_MARKER).write_text("")
    by_hand = library / "v20250101T000000000000Z"  # the same name, but no build wrote it: kept
    by_hand.mkdir()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    (docs / "new-leaflet.txt").write_text(ARTICLES["Stroke"])
    code, _, err = build(docs, library, capsys, *TIGHT)
    assert code == 0, err
    assert not orphan.exists() and by_hand.is_dir()
    served = (library / CURRENT_FILE).read_text()
    assert str(library / served / "manifest.json") in synced and str(library) in synced  # the manifest, then the switch
    assert str(library / served) in synced
