"""A small document library made by the tests: the fixture articles as PDF, DOCX, HTML, Markdown and text.

The hand-hygiene article is page 2 of a PDF whose page 1 is a title page, so that an answer's page
can be checked; the warfarin article is a DOCX under a "Warfarin" heading.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import FIXTURES

ARTICLES = {a["title"]: a["paragraphs"][0]["context"]
            for a in json.loads((FIXTURES / "tiny-squad.json").read_text())["data"]}
TITLE_PAGE = "Infection control handbook. Issued by the infection control team of the hospital."


def write_pdf(path: Path, pages: list[str]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))


def write_docx(path: Path, heading: str, paragraphs: list[str]) -> None:
    import docx

    document = docx.Document()
    document.add_heading(heading, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    document.save(str(path))


def write_library(folder: Path, titles=tuple(ARTICLES), *, broken: bool = True) -> Path:
    """The fixture articles of ``titles`` in ``folder`` (one format each), and a broken PDF."""
    folder.mkdir(parents=True, exist_ok=True)
    writers = {
        "Hand hygiene": lambda text: write_pdf(folder / "hand-hygiene.pdf", [TITLE_PAGE, text]),
        "Warfarin": lambda text: write_docx(folder / "warfarin.docx", "Warfarin", [text]),
        "Stroke": lambda text: (folder / "stroke.html").write_text(
            f"<html><head><style>p {{}}</style></head><body><h2>Stroke</h2><p>{text}</p></body></html>"),
        "Dehydration in children": lambda text: (folder / "guides" / "dehydration.md").write_text(
            f"# Dehydration in children\n\n{text}\n"),
    }
    (folder / "guides").mkdir(exist_ok=True)
    for title in titles:
        writers[title](ARTICLES[title])
    if broken:
        (folder / "scan-0001.pdf").write_bytes(b"%PDF-1.4 this is not a PDF")
    return folder
