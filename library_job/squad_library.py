"""A SQuAD-format file as a library, for the library's jobs (``evaluate``, ``mine``) and benchmarks:
its paragraphs (or whole articles) written as documents and indexed with ``python -m library_job
build``, or a folder of real documents with each question's document found by its paragraph's text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qa_common.library.embedding import EMBEDDER
from qa_common.library.index import LibraryError

COLLECTION = "squad"
DOCUMENT_SHAPES = ("paragraph", "article")  # what one written document holds


def paragraph_documents(records: list[dict]) -> dict[str, str]:
    """``{document name: paragraph}`` for the distinct paragraphs of ``records``: ``ARTICLE/PARAGRAPH.txt``
    numbered in the file's order (titles stay out of file names)."""
    names, articles, per_article = {}, {}, {}
    for record in records:
        if record["context"] not in names:
            article = articles.setdefault(record.get("title") or "", len(articles))
            per_article[article] = per_article.get(article, -1) + 1
            names[record["context"]] = f"{article:04d}/{per_article[article]:04d}.txt"
    return {name: text for text, name in names.items()}


def squad_documents(records: list[dict], shape: str) -> tuple[dict[str, str], dict[str, str]]:
    """``(documents, name_of)``: the documents of ``records``, one per ``shape`` (a paragraph, as
    :func:`paragraph_documents`; or an article: its distinct paragraphs in the file's order as one long
    document ``ARTICLE.txt``, blank lines between them), and the document that holds each paragraph."""
    if shape == "paragraph":
        documents = paragraph_documents(records)
        return documents, {text: name for name, text in documents.items()}
    articles: dict[str, list[str]] = {}
    for record in records:
        paragraphs = articles.setdefault(record.get("title") or "", [])
        if record["context"] not in paragraphs:
            paragraphs.append(record["context"])
    names = {title: f"{number:04d}.txt" for number, title in enumerate(articles)}
    documents = {names[title]: "\n\n".join(paragraphs) for title, paragraphs in articles.items()}
    return documents, {paragraph: names[title] for title, paragraphs in articles.items() for paragraph in paragraphs}


def folder_documents(docs_dir: Path, contexts: set[str]) -> dict[str, str]:
    """``{paragraph: document name}`` for the paragraphs found in a folder's documents, as the library
    reads them (PDF, Word, HTML, Markdown, text): a paragraph is in a document whose text holds its
    first 80 characters, whitespace aside (a PDF's line breaks are not the paragraph's)."""
    from qa_common.library.documents import ReadLimits, read_blocks
    from qa_common.library.folder import list_documents

    def flat(text: str) -> str:
        return re.sub(r"\s+", " ", text).strip()

    listed, _ = list_documents(docs_dir.resolve(), COLLECTION, ReadLimits())
    texts = {d["document"]: flat(" ".join(block.text for block in read_blocks(Path(d["path"]))))
             for d in listed if not d["unreadable"]}
    found = {}
    for context in contexts:
        head = flat(context)[:80]
        found.update({context: name for name, text in texts.items() if head in text})
    return found


def add_embedder_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedder", default=EMBEDDER, help="the sentence embedder the library is built with "
                        f"(default: {EMBEDDER}; a directory from `python -m train_job.embedder`)")


def build_library(documents: dict[str, str], output: Path, address: str | None, embedder: str = EMBEDDER) -> Path:
    """``documents`` written under ``OUTPUT/library/squad`` and indexed in ``OUTPUT/library/index``."""
    docs = output / "library" / COLLECTION
    for name, text in documents.items():
        (docs / name).parent.mkdir(parents=True, exist_ok=True)
        (docs / name).write_text(text, encoding="utf-8")
    return index_folder(docs, output / "library" / "index", address, embedder)


def index_folder(docs: Path, library: Path, address: str | None, embedder: str = EMBEDDER) -> Path:
    """``python -m library_job build DOCS --library LIBRARY``: the library a user would build."""
    from library_job.__main__ import main as library_job

    command = ["build", str(docs), "--library", str(library), "--embedder", embedder] + \
        (["--address", address] if address else [])
    if library_job(command) != 0:
        raise LibraryError(f"the library could not be built in {library}")
    return library
