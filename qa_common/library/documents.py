"""Read a document of a library into text blocks that know their page and section.

A *block* is one paragraph (or list item, table cell, heading-less line run) of a document's text,
with the 1-based ``page`` it is on (PDFs only: other formats have no pages, ``None``) and the
nearest heading above it (``section``, "" before the first one). Formats: ``.pdf`` (the text layer of
each page, pypdf: a scan without one gives no text; paragraphs where blank lines mark them, which
a PDF's layout rarely does, so a page is mostly one block), ``.docx`` (python-docx; "Heading N" and
"Title" styles are headings), ``.html``/``.htm`` (h1-h6 are headings; script and style are
dropped), ``.md`` (``#`` headings), ``.txt`` (paragraphs are separated by blank lines).

A file that cannot be read raises :class:`DocumentError` with a reason that never quotes the
document's text. Every read is bounded (:class:`ReadLimits`): a file's bytes before it is opened, a
PDF's pages before its text is extracted, and the characters extracted as they come; the seconds
and the memory a read may take are bounded by the process that runs it
(:mod:`qa_common.library.sandbox`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

SUFFIXES = (".pdf", ".docx", ".html", ".htm", ".md", ".txt")


class DocumentError(ValueError):
    """A document could not be read; the message says why (never its content)."""


@dataclass(frozen=True)
class ReadLimits:
    """What reading one file may take. The defaults hold a hospital library's largest real documents
    (a 1,000-page formulary, a 60 MB scanned-and-OCRed guideline) with room to spare; each is a flag
    of ``python -m library_job build`` to raise."""

    max_file_mb: float = 100.0
    max_pages: int = 2_000
    max_chars: int = 10_000_000
    max_seconds: float = 120.0
    max_memory_mb: int = 2_048

    def __post_init__(self):
        for name in ("max_file_mb", "max_pages", "max_chars", "max_seconds", "max_memory_mb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class _Text:
    """Counts the characters a reader extracts; :class:`DocumentError` past the limit."""

    def __init__(self, limits: ReadLimits):
        self.limits, self.chars = limits, 0

    def add(self, text: str) -> str:
        self.chars += len(text)
        if self.chars > self.limits.max_chars:
            raise DocumentError(f"has more than {self.limits.max_chars:,} characters of text (--max-chars)")
        return text


@dataclass(frozen=True)
class Block:
    text: str
    page: int | None
    section: str


def read_blocks(path: Path, limits: ReadLimits = ReadLimits()) -> list[Block]:
    """The text blocks of the document at ``path``, in reading order (see the module docstring)."""
    suffix = path.suffix.lower()
    readers = {".pdf": _pdf_blocks, ".docx": _docx_blocks, ".html": _html_blocks, ".htm": _html_blocks,
               ".md": _markdown_blocks, ".txt": _text_blocks}
    if suffix not in readers:
        raise DocumentError(f"unsupported file type {suffix or '(none)'}; supported: {', '.join(SUFFIXES)}")
    if path.stat().st_size > limits.max_file_mb * 2**20:
        raise DocumentError(f"is larger than {limits.max_file_mb:g} MB (--max-file-mb)")
    text = _Text(limits)
    try:
        blocks = readers[suffix](path, text)
    except (DocumentError, MemoryError):
        raise
    except UnicodeDecodeError:
        raise DocumentError("not UTF-8 text; save it as UTF-8") from None
    except Exception as error:  # noqa: BLE001 - each parser fails its own way on a broken file
        raise DocumentError(f"could not be read as {suffix} ({type(error).__name__})") from None
    blocks = [block for block in blocks if block.text]
    if not blocks:
        raise DocumentError("has no text (a scanned PDF needs OCR first)" if suffix == ".pdf" else "has no text")
    return blocks


def _clean(text: str) -> str:
    """One paragraph's text on one line: runs of whitespace (line breaks of the layout) become one space."""
    return re.sub(r"\s+", " ", text).strip()


def paragraphs(text: str) -> list[str]:
    """Paragraphs of plain text: separated by blank lines."""
    return [_clean(part) for part in re.split(r"\n\s*\n", text) if part.strip()]


def _pdf_blocks(path: Path, text: _Text) -> list[Block]:
    from pypdf import PdfReader

    reader = PdfReader(path)
    if reader.is_encrypted:
        raise DocumentError("is an encrypted PDF; save an unencrypted copy")
    if len(reader.pages) > text.limits.max_pages:
        raise DocumentError(f"has {len(reader.pages):,} pages, more than {text.limits.max_pages:,} (--max-pages)")
    blocks = []
    for number, page in enumerate(reader.pages, start=1):
        blocks += [Block(paragraph, number, "") for paragraph in paragraphs(text.add(page.extract_text() or ""))]
    return blocks


def _docx_blocks(path: Path, text_: _Text) -> list[Block]:
    import docx

    blocks, section = [], ""
    for paragraph in docx.Document(str(path)).paragraphs:
        text = _clean(text_.add(paragraph.text))
        style = paragraph.style.name if paragraph.style is not None else ""
        if text and (style.startswith("Heading") or style == "Title"):
            section = text
        else:
            blocks.append(Block(text, None, section))
    return blocks


def _markdown_blocks(path: Path, text: _Text) -> list[Block]:
    blocks, section, lines = [], "", []
    for line in [*text.add(path.read_text(encoding="utf-8")).splitlines(), ""]:
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading or not line.strip():
            blocks.append(Block(_clean(" ".join(lines)), None, section))
            lines = []
            section = _clean(heading.group(1)) if heading else section
        else:
            lines.append(line)
    return blocks


def _text_blocks(path: Path, text: _Text) -> list[Block]:
    return [Block(paragraph, None, "") for paragraph in paragraphs(text.add(path.read_text(encoding="utf-8")))]


class _HTMLText(HTMLParser):
    BLOCKS = {"p", "li", "td", "th", "div", "pre", "blockquote", "dd", "dt", "br", "tr", "section", "article"}
    HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
    SKIPPED = {"script", "style", "head", "noscript", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.section, self.text, self.skipping, self.in_heading = "", [], 0, False

    def flush(self) -> None:
        text, self.text = _clean("".join(self.text)), []
        if not text:
            return
        if self.in_heading:
            self.section = text
        else:
            self.blocks.append(Block(text, None, self.section))

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self.skipping += 1
        elif tag in self.BLOCKS or tag in self.HEADINGS:
            self.flush()
            self.in_heading = tag in self.HEADINGS

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS or tag in self.HEADINGS:
            self.flush()
            self.in_heading = False

    def handle_data(self, data):
        if not self.skipping:
            self.text.append(data)


def _html_blocks(path: Path, text: _Text) -> list[Block]:
    parser = _HTMLText()
    parser.feed(text.add(path.read_text(encoding="utf-8")))
    parser.close()
    parser.flush()
    return parser.blocks
