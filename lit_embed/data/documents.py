"""Documents to generate questions about: a folder, a glob or one file of plain text, Markdown, HTML and PDF.

Each document's id is its path relative to the folder (or to the glob's fixed part), with ``/`` separators, so the
same files give the same ids on any machine. A file that cannot be read as text (binary, not UTF-8, a broken or
encrypted PDF, nothing but whitespace) is not an error: it is returned with the reason, for the caller to name and
count. Hidden files and folders (``.git``, ``.DS_Store``) are not looked at.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import itertools
import os
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lit_embed.errors import LitEmbedError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
PDF_SUFFIXES = (".pdf",)
SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES


@dataclass(frozen=True)
class Document:
    id: str  # the path relative to the folder, "/"-separated
    path: Path
    text: str
    sha256: str  # of the file's bytes: what says whether a document changed


@dataclass(frozen=True)
class SkippedFile:
    id: str
    path: Path
    reason: str
    unreadable: bool  # True: a document type that could not be read; False: not a document type at all


def find_files(source: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of every file of a folder (recursively), of a glob (``docs/**/*.md``) or one file, sorted.

    ``exclude`` is a folder whose files are never taken (the output folder, when it lies inside the documents').
    """
    source = str(source)
    path = Path(source).expanduser()
    excluded = Path(exclude).resolve() if exclude is not None else None
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        root, files = path, [Path(parent) / name for parent, _, names in _walk(path) for name in names]
    elif re.search(r"[*?[]", source):
        fixed = list(itertools.takewhile(lambda part: not re.search(r"[*?[]", part), Path(source).parts))
        root = Path(*fixed).expanduser() if fixed else Path(".")
        files = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()]
        if not files:
            raise LitEmbedError(f"{source}: the pattern matches no file. Check it, or pass a folder of documents.")
    else:
        raise LitEmbedError(f"{source}: no such file or folder. Pass a folder of documents, a file or a glob.")
    found = []
    for file in files:
        relative = file.relative_to(root) if file.is_relative_to(root) else Path(file.name)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if excluded is not None and file.resolve().is_relative_to(excluded):
            continue
        found.append((relative.as_posix(), file))
    return sorted(found)


def read_documents(
    source: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> tuple[list[Document], list[SkippedFile]]:
    """The documents of ``source`` (see :func:`find_files`) with their text, and the files that were skipped, why."""
    files = find_files(source, exclude)
    pdfs = [doc_id for doc_id, path in files if path.suffix.lower() in PDF_SUFFIXES]
    if pdfs and importlib.util.find_spec("pypdf") is None:
        raise LitEmbedError(
            f"{source}: {len(pdfs)} PDF files (first: {pdfs[0]}) need pypdf to be read: pip install 'lit_embed[pdf]'. "
            "Or leave them out with a glob, e.g. 'docs/**/*.md'."
        )
    documents, skipped = [], []
    for doc_id, path in files:
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            reason = f"not a document type ({suffix or 'no extension'}; read are {', '.join(SUFFIXES)})"
            skipped.append(SkippedFile(doc_id, path, reason, unreadable=False))
            continue
        try:
            data = path.read_bytes()
        except OSError as err:
            skipped.append(SkippedFile(doc_id, path, f"cannot be read ({err.strerror})", unreadable=True))
            continue
        text, reason = _pdf_text(data) if suffix in PDF_SUFFIXES else _text(data, html=suffix in HTML_SUFFIXES)
        if reason is None and not text.strip():
            reason = "holds no text" + (" (a scanned PDF needs OCR first)" if suffix in PDF_SUFFIXES else "")
        if reason is not None:
            skipped.append(SkippedFile(doc_id, path, reason, unreadable=True))
        else:
            documents.append(Document(doc_id, path, text, hashlib.sha256(data).hexdigest()))
    return documents, skipped


def _walk(folder: Path):
    for parent, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: os.walk does not enter the others
        yield parent, dirs, sorted(names)


def _text(data: bytes, html: bool) -> tuple[str, str | None]:
    if b"\x00" in data[:8192]:
        return "", "binary, not text"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return "", f"not UTF-8 text (byte {err.start}); save it as UTF-8"
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return (_html_text(text) if html else text), None


def _pdf_text(data: bytes) -> tuple[str, str | None]:
    import pypdf

    # pypdf raises many kinds of errors on a broken file (its own, ValueError, KeyError, ...); each means the
    # same here: this file is skipped, named with the error.
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return "", "an encrypted PDF; save a copy without a password"
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as err:
        return "", f"not a readable PDF ({type(err).__name__}: {err})"
    return "\n\n".join(page.strip() for page in pages), None


_BLOCKS = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "section", "article", "header", "footer",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "main", "aside", "figure", "figcaption",
}  # fmt: skip
_HIDDEN = {"script", "style", "noscript", "template", "svg", "head"}


class _HTMLText(HTMLParser):
    """The visible text of an HTML page: blocks on lines of their own, scripts and styles left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    # Whitespace inside a block is layout; blank lines between blocks are what the chunker splits paragraphs on.
    blocks = (" ".join(block.split()) for block in re.split(r"\n\s*\n", "".join(parser.parts)))
    return "\n\n".join(block for block in blocks if block)
