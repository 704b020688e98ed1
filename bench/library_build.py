"""Index build at size: every paragraph of a SQuAD file as a library, then what serving it costs.

    python -m bench.library_build --data TRAIN.json.gz          # the 18,896 train paragraphs
    python -m bench.library_build --data DEV.json.gz --embedder sentence-transformers/all-MiniLM-L6-v2 \
        --embedder runs/embedder/model                           # two embedders, one after the other

Writes the paragraphs as text files (as ``python -m library_job evaluate`` does), runs ``python -m
library_job build`` on them (its own process, a fresh local Ray: the whole command is timed),
then a rebuild with nothing changed, and measures the index on disk and a serving replica's memory:
the resident set of a process that opens the index and the embedder and answers searches, as the
Retriever deployment does. With several ``--embedder``, each builds its own library of the same
documents in turn, and each rate is reported against the first's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import benchlib
from qa_common.library.embedding import EMBEDDER

REPLICA_PROBE = """
import json, resource, sys, time
from qa_common.library.embedding import Embedder
from qa_common.library.search import Library
library = Library(sys.argv[1]); embedder = Embedder(library.manifest.embedder, threads=1)
questions = json.loads(sys.argv[2]); times = []
for question in questions:
    started = time.perf_counter()
    library.search(question, embedder.embed([question])[0], 5)
    times.append(time.perf_counter() - started)
times.sort()
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "search_ms_p50": 1000 * times[len(times) // 2]}))
"""


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout


def build_and_probe(docs: Path, index: Path, embedder: str, records: list[dict]) -> dict:
    """``python -m library_job build`` timed whole, a rebuild with nothing changed, the index's size and a
    serving replica's memory and search time."""
    from qa_common.library.index import read_manifest

    build = [sys.executable, "-m", "library_job", "build", str(docs), "--library", str(index), "--embedder", embedder]
    build_s, output = timed(build)
    print(output, flush=True)
    rebuild_s, _ = timed(build)
    manifest = read_manifest(index)
    passages = sum(c["passages"] for c in manifest.collections.values())
    size = sum(f.stat().st_size for f in (index / manifest.version).rglob("*") if f.is_file())
    probe = subprocess.run([sys.executable, "-c", REPLICA_PROBE, str(index),
                            json.dumps([r["question"] for r in records[::500][:40]])],
                           check=True, capture_output=True, text=True)
    replica = json.loads(probe.stdout.strip().splitlines()[-1])
    return {"embedder": embedder, "passages": passages, "build_command_s": round(build_s, 1),
            "passages_per_s_whole_command": round(passages / build_s, 1),
            "unchanged_rebuild_s": round(rebuild_s, 1), "index_mb": round(size / 2**20, 1),
            "bytes_per_passage": round(size / passages), "replica_rss_mb": round(replica["rss_mb"]),
            "search_ms_p50": round(replica["search_ms_p50"], 1),
            "one_million_passages": {"build_hours_on_2_cores": round(1e6 / (passages / build_s) / 3600, 1),
                                     "index_gb": round(1e6 * size / passages / 2**30, 2)}}


def main(argv=None) -> int:
    from qa_common import read_squad
    from library_job.squad_library import paragraph_documents

    parser = argparse.ArgumentParser(prog="python -m bench.library_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=benchlib.SQUAD_FULL_TRAIN)
    parser.add_argument("--workdir", type=Path, default=None, help="where the documents and the library go")
    parser.add_argument("--embedder", action="append", help=f"an embedder to build with (repeat to compare; "
                        f"default: {EMBEDDER})")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "library_build.json")
    args = parser.parse_args(argv)
    load_before = benchlib.load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="library-build-"))
    records = read_squad(args.data)
    documents = paragraph_documents(records)
    docs = workdir / "squad"
    for name, text in documents.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text, encoding="utf-8")
    embedders = args.embedder or [EMBEDDER]
    builds = [build_and_probe(docs, workdir / f"library-{i}", embedder, records) for i, embedder in enumerate(embedders)]
    for build in builds[1:]:
        build["passages_per_s_vs_first"] = round(build["passages_per_s_whole_command"]
                                                 / builds[0]["passages_per_s_whole_command"], 3)
    results = {"paragraphs": len(documents), "builds": builds}
    print(json.dumps(results, indent=2))
    ratios = {"passages_per_s": builds[0]["passages_per_s_whole_command"],
              **{f"passages_per_s_vs_first_{i}": b["passages_per_s_vs_first"] for i, b in enumerate(builds) if i}}
    benchlib.write_json(args.out, "library_build", ratios, results,
                        {"data": benchlib.data_label(args.data), "embedders": embedders}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
