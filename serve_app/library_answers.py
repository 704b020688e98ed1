"""What the ingress makes of the document library: citations, sources, and the manifest it reports."""

from pathlib import Path

from starlette.exceptions import HTTPException

from qa_common.library.index import BUILD_COMMAND, CITATION_FIELDS, LibraryError, Manifest, read_manifest

NO_LIBRARY = (f"this service has no document library: build one with `{BUILD_COMMAND}` and start the service "
              "with --library LIBRARY")


def cite(answer: dict, passages: list[dict]) -> dict:
    """A library answer: the answer with its passage's citation (all None for 'not in these documents')."""
    passage = passages[answer["passage"]] if answer["passage"] >= 0 else None
    return {**{key: value for key, value in answer.items() if key != "passage"},
            **{field: passage[field] if passage else None for field in CITATION_FIELDS},
            "passage": passage["text"] if passage else None}


def source(passage: dict) -> dict:
    """A passage read, as ``/v1/ask``'s ``sources`` list it: where it is, not its text."""
    return {field: passage[field] for field in CITATION_FIELDS}


def served_manifest(library: str | None) -> Manifest:
    """The served library's manifest; 404 without a library, 503 when its index cannot be read."""
    if not library:
        raise HTTPException(404, NO_LIBRARY)
    try:
        return read_manifest(Path(library))
    except (LibraryError, FileNotFoundError):
        raise HTTPException(503, "the document library's index cannot be read on this server; build it "
                            f"with `{BUILD_COMMAND}` where the service can read it") from None
