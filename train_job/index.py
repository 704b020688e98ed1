"""``python -m train_job.index build DOCS_DIR --index INDEX``: a document library's index, built with Ray Data.

Pipeline: the driver lists DOCS_DIR's documents (``qa_common.documents.SUFFIXES``) and hashes them;
documents whose content hash the served version already holds keep their passages and vectors
(read back from its Lance table); Ray Data tasks read the new and changed files into passages
(:func:`qa_common.passages.split_passages`), a pool of actors embeds them
(:class:`qa_common.embedding.Embedder`), and Ray Data writes the new version's Lance table; then
the version is published (:func:`qa_common.library.publish_version`). Documents that are gone from
DOCS_DIR are dropped. A file that cannot be read is reported with its reason and left out; the rest
goes on. Runs locally and with ``ray job submit`` (DOCS_DIR and INDEX then on storage every node mounts).

An index holds several collections (``--collection``, default: DOCS_DIR's name); a build replaces
only its own collection's documents.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from qa_common.documents import SUFFIXES, DocumentError, read_blocks
from qa_common.embedding import EMBEDDER, embedding_dimension
from qa_common.library import (
    PASSAGE_COLUMNS, TABLE, LibraryError, check_collection_name, current_version, publish_version, read_manifest,
)
from qa_common.passages import MAX_PASSAGE_WORDS, split_passages
from train_job.cli import at_least

ERROR = "error"  # the one column of a row that reports a file that could not be read


def passage_schema(dimension: int):
    import pyarrow as pa

    return pa.schema([("passage_id", pa.string()), ("collection", pa.string()), ("document", pa.string()),
                      ("page", pa.int32()), ("section", pa.string()), ("text", pa.string()),
                      ("sha256", pa.string()), ("vector", pa.list_(pa.float32(), dimension))])


def list_documents(docs_dir: Path, collection: str) -> list[dict]:
    """Every document under ``docs_dir`` (hidden files and folders skipped), with its content hash."""
    documents = []
    for path in sorted(docs_dir.rglob("*")):
        relative = path.relative_to(docs_dir)
        if path.is_file() and path.suffix.lower() in SUFFIXES and not any(p.startswith(".") for p in relative.parts):
            documents.append({"path": str(path.resolve()), "document": relative.as_posix(), "collection": collection,
                              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return documents


def read_passages(row: dict, max_words: int) -> list[dict]:
    """Ray Data ``flat_map``: one document -> its passage rows (``error`` ""), or one row whose
    ``error`` says why it cannot be read."""
    base = {"collection": row["collection"], "document": row["document"], "sha256": row["sha256"]}
    try:
        passages = split_passages(read_blocks(Path(row["path"])), max_words)
    except DocumentError as error:
        return [{**base, "passage_id": "", "page": None, "section": "", "text": "", ERROR: str(error)}]
    key = hashlib.sha256(f"{row['collection']}/{row['document']}/{row['sha256']}".encode()).hexdigest()[:16]
    return [{**base, "passage_id": f"{key}-{number:05d}", "page": passage.page, "section": passage.section,
             "text": passage.text, ERROR: ""} for number, passage in enumerate(passages)]


class EmbedPassages:
    """Ray Data actor: a batch of passage rows -> the same rows with their ``vector``."""

    def __init__(self, embedder: str, threads: int):
        from qa_common.embedding import Embedder

        self.embedder = Embedder(embedder, threads=threads)
        self.schema = passage_schema(self.embedder.dimension)

    def __call__(self, batch):
        import pyarrow as pa

        vectors = self.embedder.embed(batch.column("text").to_pylist())
        columns = {name: batch.column(name) for name in (*PASSAGE_COLUMNS, "sha256")}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        return pa.table(columns).cast(self.schema)


def kept_rows(previous_version: Path, kept: set[str]):
    """The previous version's rows of the documents in ``kept`` (``collection/document`` keys), as Arrow batches."""
    import lancedb

    table = lancedb.connect(str(previous_version)).open_table(TABLE)
    for batch in table.search().limit(None).to_batches(batch_size=4096):
        keys = [f"{c}/{d}" for c, d in zip(batch.column("collection").to_pylist(), batch.column("document").to_pylist())]
        yield batch.filter([key in kept for key in keys])


def write_table(version_dir: Path, sources: list, schema) -> Counter:
    """One Lance table in ``version_dir`` from every batch of ``sources`` (Ray datasets, iterators of
    Arrow batches), streamed: the driver holds one block at a time. Returns the passages written per
    ``collection/document``. (Ray Data 2.60's ``write_lance`` fails with pylance 14, and LanceDB
    itself needs no pylance.)"""
    import lancedb
    import pyarrow as pa

    written = Counter()

    def batches():
        for source in sources:
            blocks = source.iter_batches(batch_size=None, batch_format="pyarrow") if hasattr(source, "iter_batches") \
                else source
            for block in blocks:
                block = pa.table(block).cast(schema)
                written.update(f"{c}/{d}" for c, d in zip(block.column("collection").to_pylist(),
                                                         block.column("document").to_pylist()))
                yield from block.to_batches()

    lancedb.connect(str(version_dir)).create_table(TABLE, data=pa.RecordBatchReader.from_batches(schema, batches()))
    return written


def plan_build(documents: list[dict], previous: dict | None, collection: str) -> dict:
    """Which of ``collection``'s documents to read, which to keep as they are, which were removed.

    A document is kept when the previous version holds it with the same content hash (also one
    that could not be read then: it is reported again, not read again)."""
    previous = previous or {"documents": {}, "failed": {}}
    old = {key: doc for table in ("documents", "failed") for key, doc in previous[table].items()
           if doc["collection"] == collection}
    new = {f"{collection}/{doc['document']}": doc for doc in documents}
    kept = {key for key, doc in new.items() if key in old and old[key]["sha256"] == doc["sha256"]}
    return {"read": [doc for key, doc in new.items() if key not in kept], "kept": kept,
            "changed": sum(key in old for key in new if key not in kept), "removed": sorted(set(old) - set(new))}


def read_and_embed(args: argparse.Namespace, documents: list[dict]):
    """``(embedded passages as a Ray dataset or None, {document: reason} of those that could not be read)``."""
    import ray
    import ray.data

    parsed = ray.data.from_items(documents, override_num_blocks=min(len(documents), 200)).flat_map(
        read_passages, fn_kwargs={"max_words": args.max_passage_words}).materialize()
    failures = {row["document"]: row[ERROR] for row in parsed.filter(expr=f"{ERROR} != ''").take_all()}
    if len(failures) == len(documents):
        return None, failures
    actors = args.concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // args.cpus_per_actor))
    # Materialised first: a filter's tasks would wait for CPUs that the embedding actors hold.
    passages = parsed.filter(expr=f"{ERROR} == ''").drop_columns([ERROR]).materialize()
    embedded = passages.map_batches(
        EmbedPassages, fn_constructor_kwargs={"embedder": args.embedder, "threads": int(args.cpus_per_actor)},
        batch_size=args.batch_size, batch_format="pyarrow", num_cpus=args.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=actors))
    return embedded, failures


def build_version(args: argparse.Namespace, index: Path, version: str, previous: dict | None, collection: str,
                  plan: dict) -> tuple[dict, int]:
    """Write ``version``'s table (the kept rows and the new ones) and return its manifest and the
    number of passages embedded now."""
    sources, failures = [], {}
    if plan["read"]:
        embedded, failures = read_and_embed(args, plan["read"])
        sources += [embedded] if embedded is not None else []
    previous = previous or {"documents": {}, "failed": {}}
    kept = {key: doc for key, doc in previous["documents"].items() if doc["collection"] != collection or key in plan["kept"]}
    if kept:
        sources.append(kept_rows(index / previous["version"], set(kept)))
    written = write_table(index / version, sources, passage_schema(embedding_dimension(args.embedder))) if sources \
        else Counter()
    documents = dict(kept)
    for doc in plan["read"]:
        key = f"{collection}/{doc['document']}"
        if doc["document"] not in failures:
            documents[key] = {"collection": collection, "document": doc["document"], "sha256": doc["sha256"],
                              "passages": written[key]}
    failed = {key: doc for key, doc in previous["failed"].items() if doc["collection"] != collection or key in plan["kept"]}
    failed.update({f"{collection}/{doc['document']}": {"collection": collection, "document": doc["document"],
                                                       "sha256": doc["sha256"], "reason": failures[doc["document"]]}
                   for doc in plan["read"] if doc["document"] in failures})
    collections = {}
    for doc in documents.values():
        totals = collections.setdefault(doc["collection"], {"documents": 0, "passages": 0})
        totals["documents"] += 1
        totals["passages"] += doc["passages"]
    manifest = {"version": version, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "embedder": args.embedder, "max_passage_words": args.max_passage_words, "collections": collections,
                "documents": documents, "failed": failed}
    return manifest, sum(written[f"{collection}/{doc['document']}"] for doc in plan["read"])


def build(args: argparse.Namespace) -> dict:
    """Build or update ``args.index`` from ``args.docs_dir``; returns the served version's manifest."""
    import ray

    docs_dir, index = Path(args.docs_dir).resolve(), Path(args.index).resolve()
    collection = check_collection_name(args.collection or docs_dir.name)
    if not docs_dir.is_dir():
        raise FileNotFoundError(f"{args.docs_dir}: no such folder of documents")
    previous = read_manifest(index) if current_version(index) else None
    if previous and previous["embedder"] != args.embedder:
        raise LibraryError(f"{args.index} was built with embedder {previous['embedder']!r}, not {args.embedder!r}: "
                           "build a new index (--index NEW_DIR) to change the embedder")
    documents = list_documents(docs_dir, collection)
    plan = plan_build(documents, previous, collection)
    started = time.perf_counter()
    print(f"[index] collection {collection}: {len(documents)} documents ({len(plan['read']) - plan['changed']} new, "
          f"{plan['changed']} changed, {len(plan['kept'])} unchanged), {len(plan['removed'])} removed", flush=True)
    manifest = previous
    if not (previous and not plan["read"] and not plan["removed"]):
        if not ray.is_initialized():
            ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))
        version = datetime.now(timezone.utc).strftime("v%Y%m%dT%H%M%S%fZ")
        (index / version).mkdir(parents=True)
        try:
            manifest, embedded = build_version(args, index, version, previous, collection, plan)
            publish_version(index, version, manifest)
        except BaseException:
            shutil.rmtree(index / version, ignore_errors=True)  # the served version is untouched
            raise
        seconds = time.perf_counter() - started
        rate = f" ({embedded / seconds:.1f} passages/s)" if embedded else ""
        print(f"[index] version {version}: {sum(c['documents'] for c in manifest['collections'].values())} documents, "
              f"{sum(c['passages'] for c in manifest['collections'].values())} passages; {embedded} passages read and "
              f"embedded in {seconds:.1f} s{rate} -> {index}", flush=True)
    else:
        print(f"[index] up to date: version {previous['version']}", flush=True)
    failed = sorted(doc["document"] + ": " + doc["reason"] for doc in manifest["failed"].values()
                    if doc["collection"] == collection)
    if failed:
        print(f"[index] {len(failed)} file(s) could not be read and were left out:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train_job.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="index (or update the index of) a folder of documents")
    build_parser.add_argument("docs_dir", metavar="DOCS_DIR", help=f"folder of documents ({', '.join(SUFFIXES)})")
    build_parser.add_argument("--index", required=True, help="index directory (created; a rebuild updates it)")
    build_parser.add_argument("--collection", default=None, help="collection name (default: DOCS_DIR's name)")
    build_parser.add_argument("--max-passage-words", type=at_least(1), default=MAX_PASSAGE_WORDS,
                              help=f"longest passage in words (default: {MAX_PASSAGE_WORDS})")
    build_parser.add_argument("--embedder", default=EMBEDDER, help=f"sentence-embedding model (default: {EMBEDDER})")
    build_parser.add_argument("--concurrency", type=at_least(1), default=None,
                              help="embedding actors (default: as many as the cluster's CPUs hold)")
    build_parser.add_argument("--cpus-per-actor", type=at_least(1, float), default=1, help="CPUs per embedding actor (default: 1)")
    build_parser.add_argument("--batch-size", type=at_least(1), default=64, help="passages per actor call (default: 64)")
    build_parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except (FileNotFoundError, LibraryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
