"""Files → sections → overlapping chunks, each with its heading or page and its byte range.

A section is a run of text under one heading (Markdown `#` lines, HTML h1-h6) or one PDF page. Chunks are
cut inside a section, at most `chunk_chars` long, preferably at a paragraph, line, sentence or word break,
and neighbours share about `overlap_chars` so a sentence cut at a boundary is whole in one of them.

Byte ranges are offsets into the document's text: for .txt and .md that is the file itself (so
`file[byte_start:byte_end]` is the chunk, whitespace trimmed); for HTML and PDF it is the extracted text
(sections joined by a blank line), since their markup has no byte-for-byte counterpart of the text.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from launcher.errors import ChorusError

KINDS: dict[str, str] = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
                         ".html": "html", ".htm": "html", ".pdf": "pdf"}
_SECTION_SEP = "\n\n"  # between extracted sections (HTML, PDF) in the text byte ranges refer to
UTF8_BOM = b"\xef\xbb\xbf"


class UnreadableFile(ChorusError):
    """A document could not be read or parsed (permissions, a damaged PDF, an encrypted one)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: cannot be read ({reason})",
                         hint="The file is skipped; the other files are indexed.")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Section:
    text: str
    heading: str | None = None
    page: int | None = None    # 1-based PDF page
    start: int = 0             # character offset of `text` in the document text


@dataclass(frozen=True)
class Document:
    """A file's text as sections; `encoding` is what byte offsets are counted in, from `byte_base` on (the
    bytes of the file before its text: a UTF-8 BOM, 3)."""

    kind: str
    sections: list[Section]
    encoding: str = "utf-8"
    byte_base: int = 0

    @property
    def text(self) -> str:
        """The document text the sections' offsets refer to."""
        out: list[str] = []
        pos = 0
        for s in self.sections:
            out.append("\n" * (s.start - pos) if s.start > pos else "")
            out.append(s.text)
            pos = s.start + len(s.text)
        return "".join(out)


@dataclass(frozen=True)
class Chunk:
    seq: int
    text: str
    heading: str | None
    page: int | None
    byte_start: int
    byte_end: int


def kind_of(path: Path) -> str | None:
    return KINDS.get(path.suffix.lower())


# ---------------------------------------------------------------- reading


def decode(data: bytes) -> tuple[str, str]:
    """UTF-8, else Latin-1, which decodes any byte: (text, encoding). read_document strips a UTF-8 BOM first
    (else it led the text: a Markdown file's first heading was not seen) and counts its bytes in the offsets."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_sections(text: str) -> list[Section]:
    """Sections at each ATX heading outside code fences; they tile the text, heading line included."""
    sections: list[Section] = []
    start, heading, fenced, pos = 0, None, False, 0
    for line in text.splitlines(keepends=True):
        if _MD_FENCE.match(line):
            fenced = not fenced
        m = None if fenced else _MD_HEADING.match(line.rstrip("\r\n"))
        if m and pos > start:
            sections.append(Section(text[start:pos], heading, None, start))
            start = pos
        if m:
            heading = m.group(2).strip()
        pos += len(line)
    if pos > start or not sections:
        sections.append(Section(text[start:pos], heading, None, start))
    return sections


_BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header", "footer", "pre",
          "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt", "hr", "nav", "main", "aside", "figure"}
_SKIP = {"script", "style", "noscript", "template", "svg", "head"}


class _HtmlText(HTMLParser):
    """Visible text of an HTML page, one section per h1-h6 (the <title> names the part before the first)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[str | None, list[str]]] = [(None, [])]
        self.skip = 0
        self.in_heading: list[str] | None = None
        self.in_title: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = []
        elif tag in _SKIP:
            self.skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.in_heading = []
        if tag in _BLOCK:
            self.parts[-1][1].append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self.in_title is not None:
            title = " ".join("".join(self.in_title).split())
            if self.parts[0][0] is None and title:
                self.parts[0] = (title, self.parts[0][1])
            self.in_title = None
        elif tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self.in_heading is not None:
            heading = " ".join("".join(self.in_heading).split())
            self.in_heading = None
            self.parts.append((heading or None, [heading, "\n"]))
        elif tag in _BLOCK:
            self.parts[-1][1].append("\n")

    def handle_data(self, data: str) -> None:
        if self.in_title is not None:
            self.in_title.append(data)
        elif self.skip:
            return
        elif self.in_heading is not None:
            self.in_heading.append(data)
        else:
            self.parts[-1][1].append(data)


def _tidy(text: str) -> str:
    """Whitespace of extracted text: runs of spaces to one, at most one blank line."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _joined(items: Sequence[tuple[str, str | None, int | None]]) -> list[Section]:
    """Extracted sections placed one after another, separated by a blank line (what offsets count in)."""
    sections, pos = [], 0
    for text, heading, page in items:
        if not text:
            continue
        sections.append(Section(text, heading, page, pos))
        pos += len(text) + len(_SECTION_SEP)
    return sections


def html_sections(text: str) -> list[Section]:
    parser = _HtmlText()
    parser.feed(text)
    parser.close()
    return _joined([(_tidy("".join(parts)), heading, None) for heading, parts in parser.parts])


_PYPDF_LOG = logging.getLogger("pypdf")
_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_saved = logging.NOTSET


@contextlib.contextmanager
def quiet_pypdf() -> Iterator[None]:
    """pypdf's warnings about a damaged file ("EOF marker not found", "invalid pdf header") kept off stderr while
    it reads: a file that cannot be read is reported once, by `add` ("skipped ...: not a readable PDF"). Its
    errors still show. Threads reading PDFs at once share one quiet period; the level is put back after the last."""
    global _quiet_users, _quiet_saved
    with _quiet_lock:
        if _quiet_users == 0:
            _quiet_saved = _PYPDF_LOG.level
            _PYPDF_LOG.setLevel(max(logging.ERROR, _quiet_saved))
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                _PYPDF_LOG.setLevel(_quiet_saved)


def pdf_sections(data: bytes, path: Path) -> list[Section]:
    """One section per page (pypdf's text extraction; a scanned page without a text layer is empty)."""
    with quiet_pypdf():
        return _pdf_sections(data, path)


def _pdf_sections(data: bytes, path: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableFile(path, "the PDF is encrypted")
        pages = [(_tidy(page.extract_text() or ""), None, i) for i, page in enumerate(reader.pages, start=1)]
    except UnreadableFile:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise UnreadableFile(path, f"not a readable PDF: {exc}") from None
    return _joined(pages)


def read_document(path: Path, data: bytes | None = None) -> Document:
    """The file's sections; raises UnreadableFile (never OSError or a parser's own error)."""
    kind = kind_of(path)
    if kind is None:
        raise UnreadableFile(path, f"unsupported type '{path.suffix}' (supported: {', '.join(sorted(KINDS))})")
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnreadableFile(path, exc.strerror or str(exc)) from None
    if kind == "pdf":
        return Document(kind, pdf_sections(data, path))
    bom = len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0
    text, encoding = decode(data[bom:])
    if "\x00" in text:
        raise UnreadableFile(path, "binary content (NUL bytes) in a text file")
    if kind == "markdown":
        return Document(kind, markdown_sections(text), encoding, bom)
    if kind == "html":
        return Document(kind, html_sections(text))
    return Document(kind, [Section(text, None, None, 0)], encoding, bom)


# ---------------------------------------------------------------- chunking


class _ByteOffsets:
    """Character offset → byte offset in `text`, moved incrementally (chunks walk the text in order)."""

    def __init__(self, text: str, encoding: str, base: int = 0) -> None:
        self.text, self.encoding, self.base = text, encoding, base
        self.char, self.byte = 0, 0
        self.single = encoding == "latin-1" or text.isascii()

    def at(self, i: int) -> int:
        if self.single:
            return self.base + i
        if i >= self.char:
            self.byte += len(self.text[self.char:i].encode(self.encoding))
        else:
            self.byte -= len(self.text[i:self.char].encode(self.encoding))
        self.char = i
        return self.base + self.byte


_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ")


def _cut(text: str, start: int, end: int) -> int:
    """Where to end a window [start, end): after the strongest break in its second half, else at `end`."""
    low = start + (end - start) // 2
    for sep in _BREAKS:
        i = text.rfind(sep, low, end)
        if i != -1:
            return i + len(sep)
    return end


def _word_start(text: str, i: int, limit: int) -> int:
    """`i` moved forward to the start of a word (not past `limit`), so an overlap does not begin mid-word."""
    if i <= 0 or text[i - 1].isspace():
        return i
    m = re.compile(r"\s").search(text, i, limit)
    return m.end() if m else i


def chunk_document(doc: Document, chunk_chars: int = 1000, overlap_chars: int = 150) -> list[Chunk]:
    """Every section cut into windows of at most `chunk_chars`, neighbours overlapping by about `overlap_chars`."""
    if overlap_chars >= chunk_chars:
        raise ValueError("overlap_chars must be smaller than chunk_chars")
    full = doc.text
    offsets = _ByteOffsets(full, doc.encoding, doc.byte_base)
    chunks: list[Chunk] = []
    for section in doc.sections:
        text, base, n = section.text, section.start, len(section.text)
        start = 0
        while start < n:
            end = min(start + chunk_chars, n)
            if end < n:
                end = _cut(text, start, end)
            piece = text[start:end]
            stripped = piece.strip()
            if stripped:
                s = base + start + (len(piece) - len(piece.lstrip()))
                e = base + end - (len(piece) - len(piece.rstrip()))
                b0 = offsets.at(s)
                chunks.append(Chunk(len(chunks), stripped, section.heading, section.page, b0, offsets.at(e)))
            if end >= n:
                break
            start = _word_start(text, max(end - overlap_chars, start + 1), end)
    return chunks
