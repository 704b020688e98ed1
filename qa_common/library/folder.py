"""List a library's folder of documents: every file a build may read, with its content hash.

Hidden files and folders are left out. Links, to files or folders, are never followed (a link to a
file elsewhere would put that file's text in the library and in answers): they are reported. A
file is hashed in chunks, never read whole, and a file over the size limit is not read at all: its
size and modification time stand for its content, so it is reported again, not read again, until
it changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qa_common.library.documents import SUFFIXES, ReadLimits

LINK = "is a link (links are not followed)"


def content_hash(path: Path, limits: ReadLimits) -> tuple[str, str]:
    """``(hash, "")``: the file's SHA-256, streamed; or ``(a key that changes with the file, why it is
    not read)`` for a file over the size limit, which is not read at all."""
    status = path.stat()
    if status.st_size > limits.max_file_mb * 2**20:
        return f"size-{status.st_size}-mtime-{status.st_mtime_ns}", f"is larger than {limits.max_file_mb:g} MB (--max-file-mb)"
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest(), ""


def list_documents(docs_dir: Path, collection: str, limits: ReadLimits) -> tuple[list[dict], list[dict]]:
    """``(documents, skipped)`` under ``docs_dir``: every document (hidden files and folders left
    out) with its content hash and, for one that will not be read, ``unreadable`` (why); and the
    links, which are never followed, with the files that cannot be opened."""
    documents, skipped = [], []
    for folder, directories, files in os.walk(docs_dir, followlinks=False):
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in [d for d in directories if os.path.islink(os.path.join(folder, d))]:
            directories.remove(name)
            skipped.append({"document": Path(folder, name).relative_to(docs_dir).as_posix(), "reason": LINK})
        for name in sorted(f for f in files if not f.startswith(".") and Path(f).suffix.lower() in SUFFIXES):
            path = Path(folder, name)
            document = path.relative_to(docs_dir).as_posix()
            if path.is_symlink() or not path.resolve().is_relative_to(docs_dir):
                skipped.append({"document": document, "reason": LINK})
                continue
            try:
                sha256, unreadable = content_hash(path, limits)
            except OSError as error:
                skipped.append({"document": document, "reason": f"cannot be opened ({error.strerror})"})
                continue
            documents.append({"path": str(path), "document": document, "collection": collection, "sha256": sha256,
                              "unreadable": unreadable})
    return documents, skipped
