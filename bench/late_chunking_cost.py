"""What a passage's sentence vectors cost a build: ``Embedder.embed`` (the passage's own vector, all a
build computed before) against ``Embedder.embed_passages`` (its sentences' too, pooled from the same
forward pass), on the passages of a built library, in one process, alternating.

    python -m bench.late_chunking_cost --library runs/ask-dev-sentences/library/index --rounds 2

Reports passages/s of each and their ratio (the build's embedding step; reading, splitting and
writing are the same for both), and the sentence vectors per passage.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import benchlib


def main(argv=None) -> int:
    import torch

    from qa_common.library.embedding import Embedder
    from qa_common.library.search import Library

    parser = argparse.ArgumentParser(prog="python -m bench.late_chunking_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True, help="a built library (its passages are embedded)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=benchlib.RESULTS / "late_chunking_cost.json")
    args = parser.parse_args(argv)
    benchlib.quiet_libraries()
    load_before = benchlib.load_average()
    library = Library(args.library)
    texts = [row["text"] for row in library.table.search().limit(None).select(["text"]).to_list()]
    embedder = Embedder(library.manifest.embedder)
    ways = {"passage_vector": embedder.embed, "passage_and_sentence_vectors": embedder.embed_passages}
    seconds = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, embed in ways.items():
            started = time.perf_counter()
            vectors = embed(texts)
            seconds[name].append(time.perf_counter() - started)
    results = {name: {"seconds": [round(s, 1) for s in times],
                      "passages_per_s": round(len(texts) / benchlib.median(times), 1)} for name, times in seconds.items()}
    results["sentence_vectors_per_passage"] = round(sum(len(v) - 1 for v in vectors) / len(texts), 2)
    ratios = {"with_sentence_vectors_vs_passage_vector_passages_per_s": round(
        results["passage_and_sentence_vectors"]["passages_per_s"] / results["passage_vector"]["passages_per_s"], 3)}
    benchlib.print_table("Embedding a library's passages", [{"way": k, **v} for k, v in results.items()
                                                             if isinstance(v, dict)], ["way", "seconds", "passages_per_s"])
    benchlib.write_json(args.out, "late_chunking_cost", ratios, results,
                        {"library": str(args.library), "passages": len(texts), "embedder": library.manifest.embedder,
                         "rounds": args.rounds, "torch_threads": torch.get_num_threads()}, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
