"""Shared helpers for the knowledge tests: a small real corpus (Wikipedia summaries) and the real embedder."""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.documents import Document, wiki_documents

# Distinct topics, so that a query names exactly one of them.
TOPICS = ["Mona_Lisa", "Leonardo_da_Vinci", "Jupiter", "Photosynthesis", "Chess", "Volcano", "Ludwig_van_Beethoven",
          "Mount_Everest", "Penicillin", "Great_Wall_of_China", "Pythagorean_theorem", "Bee", "Cro-Magnon"]


def small_wiki(n: int | None = None) -> list[Document]:
    wanted = {"wiki:" + t for t in TOPICS[:n]}
    docs = [d for d in wiki_documents() if d.id in wanted]
    assert len(docs) == len(wanted), sorted(wanted - {d.id for d in docs})
    return docs


def write_jsonl(path: Path, docs: list[Document]) -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text, "title": d.title, "url": d.url}) + "\n")
    return path


NEW_FACT = Document("note:zorbl", "The zorblax festival is held every spring in the town of Quillmere, where "
                    "people race giant pumpkins across the lake.", "Zorblax festival", "https://example.org/zorblax",
                    "test")
