"""``python -m library_job build DOCS_DIR --library LIBRARY``: a document library's index, built with Ray Data.

Pipeline: the driver lists DOCS_DIR's documents (``qa_common.library.documents.SUFFIXES``) and
hashes them; documents whose content hash the served version already holds keep their passages
and vectors (read back from its table); Ray Data tasks read the new and changed files into
passages (:func:`qa_common.library.passages.split_passages`), a pool of actors embeds them
(:class:`qa_common.library.embedding.Embedder`), and the driver streams them into the new
version's table; then the version is published (:func:`qa_common.library.index.publish_version`).
Documents that are gone from DOCS_DIR are dropped; with nothing to read or drop, a build publishes
nothing, unless the served version lacks an index (:func:`qa_common.library.index.is_indexed`): then
it is copied into one that has them, nothing embedded again. Runs locally and with ``ray job
submit`` (DOCS_DIR and LIBRARY then on storage every node mounts).

The documents are untrusted: each is read in a child process under limits (bytes, pages,
characters, seconds, memory: :class:`qa_common.library.documents.ReadLimits`, a flag each), links
are never followed, and a file that cannot be read, or breaks a limit, is left out and recorded, so
the next build does not read it again until it changes; the rest of the library is indexed. The
output names no document (a file name can name a patient): it counts files and reasons, and the
list is written to LIBRARY/build-report.json (0600). One build at a time holds LIBRARY's lock; an
empty DOCS_DIR (an unmounted volume, say) is refused unless ``--allow-empty``.

A library holds several collections (``--collection``, default: DOCS_DIR's name); a build replaces
only its own collection's documents.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from qa_common.library.documents import SUFFIXES, DocumentError, ReadLimits
from qa_common.library.embedding import EMBEDDER, embedding_dimension
from qa_common.library.index import (
    PASSAGE_COLUMNS, REPORT_FILE, VECTORS, FailedDocument, IndexedDocument, LibraryError, Manifest, build_lock,
    check_collection_name, current_version, document_key, is_indexed, new_version, open_table, passage_id,
    passage_schema, plan_build, publish_version, read_manifest, vectors_column, write_private,
)
from qa_common.library.folder import LINK, list_documents
from qa_common.library.passages import MAX_PASSAGE_WORDS, split_passages
from qa_common.library.sandbox import SandboxedReader
from train_job.cli import at_least
from train_job.ray_cluster import ActorPool, add_actor_flags, add_address_flag, connect_ray

SUMMARY = "index (or update the index of) a folder of documents"
ERROR = "error"  # the one column of a row that reports a file that could not be read


_READER: SandboxedReader | None = None  # one child process per Ray worker, reused by its tasks


def _reader(limits: ReadLimits) -> SandboxedReader:
    global _READER
    if _READER is None or _READER.limits != limits:
        if _READER is not None:
            _READER.close()
        _READER = SandboxedReader(limits)
    return _READER


def read_passages(row: dict, max_words: int, limits: dict) -> list[dict]:
    """Ray Data ``flat_map``: one document -> its passage rows (``error`` ""), or one row whose
    ``error`` says why it cannot be read."""
    base = {"collection": row["collection"], "document": row["document"], "sha256": row["sha256"]}
    try:
        if row["unreadable"]:
            raise DocumentError(row["unreadable"])
        if Path(row["path"]).is_symlink():  # replaced by a link since it was listed
            raise DocumentError(LINK)
        passages = split_passages(_reader(ReadLimits(**limits)).read(row["path"]), max_words)
    except DocumentError as error:
        return [{**base, "passage_id": "", "page": None, "section": "", "text": "", ERROR: str(error)}]
    return [{**base, "passage_id": passage_id(row["collection"], row["document"], row["sha256"], number),
             "page": passage.page, "section": passage.section, "text": passage.text, ERROR: ""}
            for number, passage in enumerate(passages)]


class EmbedPassages:
    """Ray Data actor: a batch of passage rows -> the same rows with their ``vectors``."""

    def __init__(self, embedder: str, threads: int):
        from qa_common.library.embedding import Embedder

        self.embedder = Embedder(embedder, threads=threads)
        self.schema = passage_schema(self.embedder.dimension)

    def __call__(self, batch):
        import pyarrow as pa

        columns = {name: batch.column(name) for name in (*PASSAGE_COLUMNS, "sha256")}
        columns[VECTORS] = vectors_column(self.embedder.embed_passages(batch.column("text").to_pylist()))
        return pa.table(columns).cast(self.schema)


def kept_rows(library: Path, version: str, kept: set[str]):
    """``version``'s rows of the documents in ``kept`` (document keys), as Arrow batches."""
    for batch in open_table(library, version).search().limit(None).to_batches(batch_size=4096):
        keys = [document_key(c, d) for c, d in zip(batch.column("collection").to_pylist(),
                                                   batch.column("document").to_pylist())]
        yield batch.filter([key in kept for key in keys])


def write_table(version_dir: Path, embedded, kept, schema) -> Counter:
    """One Lance table in ``version_dir``: the ``embedded`` passages (a Ray dataset, or None) streamed
    in one commit, the driver holding one block at a time, then the ``kept`` ones (Arrow batches read
    from the served version) a batch per commit. Kept rows are read between LanceDB's calls,
    never inside one: LanceDB reads the rows it is given on its event loop, where a query of another
    table would wait on that same loop for ever (a rebuild that only deleted files hung so). Returns
    the passages written per document key. The driver writes the table because Ray Data 2.60's
    ``write_lance`` needs pylance, which fails with the release LanceDB 0.40 pulls in."""
    import lancedb
    import pyarrow as pa

    from qa_common.library.index import TABLE

    written = Counter()

    def counted(block) -> pa.Table:
        block = pa.table(block).cast(schema)
        written.update(document_key(c, d) for c, d in zip(block.column("collection").to_pylist(),
                                                          block.column("document").to_pylist()))
        return block

    table = lancedb.connect(str(version_dir)).create_table(TABLE, schema=schema)
    if embedded is not None:
        blocks = embedded.iter_batches(batch_size=None, batch_format="pyarrow")
        table.add(pa.RecordBatchReader.from_batches(schema, (batch for block in blocks
                                                             for batch in counted(block).to_batches())))
    for batch in kept:
        if batch.num_rows:
            table.add(counted(batch))
    return written


def read_and_embed(args: argparse.Namespace, documents: list[dict]):
    """``(embedded passages as a Ray dataset or None, {document: reason} of those that could not be read)``."""
    import ray.data

    parsed = ray.data.from_items(documents, override_num_blocks=min(len(documents), 200)).flat_map(
        read_passages, fn_kwargs={"max_words": args.max_passage_words,
                                  "limits": dataclasses.asdict(read_limits(args))}).materialize()
    failures = {row["document"]: row[ERROR] for row in parsed.filter(expr=f"{ERROR} != ''").take_all()}
    if len(failures) == len(documents):
        return None, failures
    # Materialised first: a filter's tasks would wait for CPUs that the embedding actors hold.
    passages = parsed.filter(expr=f"{ERROR} == ''").drop_columns([ERROR]).materialize()
    pool = ActorPool.fit(args, items=passages.count())
    embedded = passages.map_batches(
        EmbedPassages, fn_constructor_kwargs={"embedder": args.embedder, "threads": pool.threads},
        batch_size=args.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=pool.actors),
        **pool.per_actor)
    return embedded, failures


def build_version(args: argparse.Namespace, library: Path, version: str, previous: Manifest | None, collection: str,
                  plan: dict) -> tuple[Manifest, int]:
    """Write ``version``'s table (the kept rows and the new ones) and return its manifest and the
    number of passages embedded now."""
    embedded, failures = read_and_embed(args, plan["read"]) if plan["read"] else (None, {})
    ours = lambda doc: doc.collection != collection or document_key(doc.collection, doc.document) in plan["kept"]  # noqa: E731
    kept = {key: doc for key, doc in previous.documents.items() if ours(doc)} if previous else {}
    written = Counter()
    if embedded is not None or kept:
        written = write_table(library / version, embedded, kept_rows(library, previous.version, set(kept)) if kept
                              else (), passage_schema(embedding_dimension(args.embedder)))
    manifest = Manifest(version=version, embedder=args.embedder, max_passage_words=args.max_passage_words,
                        documents=dict(kept),
                        failed={key: doc for key, doc in previous.failed.items() if ours(doc)} if previous else {})
    for doc in plan["read"]:
        key = document_key(collection, doc["document"])
        if doc["document"] in failures:
            manifest.failed[key] = FailedDocument(collection, doc["document"], doc["sha256"], failures[doc["document"]])
        else:
            manifest.documents[key] = IndexedDocument(collection, doc["document"], doc["sha256"], written[key])
    return manifest, sum(written[document_key(collection, doc["document"])] for doc in plan["read"])


def read_limits(args: argparse.Namespace) -> ReadLimits:
    return ReadLimits(**{name: getattr(args, name) for name in ReadLimits.__dataclass_fields__})


def build(args: argparse.Namespace) -> Manifest:
    """Build or update ``args.library`` from ``args.docs_dir``; returns the served version's manifest."""
    docs_dir, library = Path(args.docs_dir).resolve(), Path(args.library).resolve()
    collection = check_collection_name(args.collection or docs_dir.name)
    if not docs_dir.is_dir():
        raise FileNotFoundError(f"{args.docs_dir}: no such folder of documents")
    if library == docs_dir or library.is_relative_to(docs_dir) or docs_dir.is_relative_to(library):
        raise LibraryError("--library and DOCS_DIR must be separate folders, neither inside the other")
    with build_lock(library):
        return _build_locked(args, docs_dir, library, collection)


def _build_locked(args: argparse.Namespace, docs_dir: Path, library: Path, collection: str) -> Manifest:
    if Path(args.embedder).is_dir():  # a fine-tuned embedder: the service reads it from another working directory
        args.embedder = str(Path(args.embedder).resolve())
    previous = read_manifest(library) if current_version(library) else None
    # A table of an earlier format is refused before any work.
    previous_table = open_table(library, previous.version) if previous else None
    if previous and previous.embedder != args.embedder:
        raise LibraryError(f"{args.library} was built with embedder {previous.embedder!r}, not {args.embedder!r}: "
                           "build a new library (--library NEW_DIR) to change the embedder")
    documents, skipped = list_documents(docs_dir, collection, read_limits(args))
    if not documents and not args.allow_empty:
        raise LibraryError(f"{args.docs_dir} holds no documents ({', '.join(SUFFIXES)}): is the volume mounted? "
                           f"Nothing was changed; --allow-empty publishes collection {collection!r} empty")
    plan = plan_build(documents, previous, collection)
    started = time.perf_counter()
    print(f"[library] collection {collection}: {len(documents)} documents ({len(plan['read']) - plan['changed']} new, "
          f"{plan['changed']} changed, {len(plan['kept'])} unchanged), {len(plan['removed'])} removed", flush=True)
    manifest = previous
    up_to_date = previous and not plan["read"] and not plan["removed"] and \
        (previous_table is None or is_indexed(previous_table))
    if not up_to_date:
        connect_ray(args.address)
        version = new_version(library)
        try:
            manifest, embedded = build_version(args, library, version, previous, collection, plan)
            publish_version(library, manifest)
        except BaseException:
            shutil.rmtree(library / version, ignore_errors=True)  # the served version is untouched
            raise
        seconds = time.perf_counter() - started
        rate = f" ({embedded / seconds:.1f} passages/s)" if embedded else ""
        totals = manifest.collections.values()
        print(f"[library] version {version}: {sum(c['documents'] for c in totals)} documents, "
              f"{sum(c['passages'] for c in totals)} passages; {embedded} passages read and "
              f"embedded in {seconds:.1f} s{rate} -> {library}", flush=True)
    else:
        print(f"[library] up to date: version {previous.version}", flush=True)
    report(library, collection, manifest, skipped)
    return manifest


def report(library: Path, collection: str, manifest: Manifest, skipped: list[dict]) -> None:
    """Counts and reasons on stderr; the files themselves in LIBRARY/build-report.json (0600)."""
    left_out = [{"document": doc.document, "reason": doc.reason} for doc in manifest.failed.values()
                if doc.collection == collection] + skipped
    left_out.sort(key=lambda entry: entry["document"])
    write_private(library / REPORT_FILE, json.dumps({"collection": collection, "version": manifest.version,
                                                     "left_out": left_out}, indent=1))
    if left_out:
        reasons = Counter(entry["reason"] for entry in left_out)
        print(f"[library] {len(left_out)} file(s) left out: " + "; ".join(
            f"{count} {reason}" for reason, count in sorted(reasons.items(), key=lambda item: -item[1])) +
            f". Which ones: {library / REPORT_FILE}", file=sys.stderr)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("docs_dir", metavar="DOCS_DIR", help=f"folder of documents ({', '.join(SUFFIXES)})")
    parser.add_argument("--library", required=True, help="the library's folder (created; a rebuild updates it)")
    parser.add_argument("--collection", default=None, help="collection name (default: DOCS_DIR's name)")
    parser.add_argument("--max-passage-words", type=at_least(1), default=MAX_PASSAGE_WORDS,
                        help=f"longest passage in words (default: {MAX_PASSAGE_WORDS})")
    parser.add_argument("--embedder", default=EMBEDDER, help=f"sentence-embedding model (default: {EMBEDDER})")
    parser.add_argument("--allow-empty", action="store_true",
                        help="publish the collection even when DOCS_DIR holds no documents (default: refuse)")
    limits = parser.add_argument_group("limits on reading one file (over one: the file is left out and reported)")
    for name, field in ReadLimits.__dataclass_fields__.items():
        kind = type(field.default)
        limits.add_argument(f"--{name.replace('_', '-')}", type=at_least(1 if kind is int else 0.001, kind),
                            default=field.default, help=f"(default: {field.default:g})")
    add_actor_flags(parser, "embedding actors")
    parser.add_argument("--batch-size", type=at_least(1), default=64, help="passages per actor call (default: 64)")
    add_address_flag(parser)


run = build
# What a user can fix: exit 2 with the message (a failing disk, say, is not: its traceback stays).
USER_ERRORS = (FileNotFoundError, LibraryError, ValueError)
