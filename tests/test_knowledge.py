"""The knowledge index: splitting, bad input, build/add/delete/persist/reload, mismatch refusal, index
types, concurrent use, the CLI and the default knowledge base.  Real embedder, real FAISS, real SQLite."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from retrieval.documents import Document, DocumentError, check_text, load_documents, split_document, split_text
from retrieval.knowledge import DuplicateId, IndexMismatch, KnowledgeError, KnowledgeIndex, UnknownId
from retrieval.vector_index import VectorIndex, resolve_factory
from tests.knowledge_support import NEW_FACT, small_wiki, write_jsonl


@pytest.fixture(scope="module")
def embedder():
    from retrieval.embedder import load_embedder

    return load_embedder()


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    """A small index built once; tests that change an index work on a copy."""
    out = tmp_path_factory.mktemp("kb") / "index"
    KnowledgeIndex.build(out, small_wiki(), embedder).close()
    return out


@pytest.fixture
def kb(built, tmp_path, embedder):
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    index = KnowledgeIndex.open(copy, embedder)
    yield index
    index.close()


# ----------------------------------------------------------------------------------------- splitting


def test_short_document_stays_one_passage_with_the_document_id():
    (p,) = split_document(Document("d1", "One sentence. Another one.", "T"))
    assert (p.id, p.doc_id, p.text, p.title) == ("d1", "d1", "One sentence. Another one.", "T")


def test_long_document_splits_on_sentence_boundaries_with_overlap():
    sentences = [f"Sentence number {i} says something about topic {i % 7} here." for i in range(60)]
    text = " ".join(sentences)
    parts = split_text(text, words=100, overlap=20)
    assert len(parts) > 3
    for part in parts:
        assert 40 <= len(part.split()) <= 100 + 25, len(part.split())
        assert part.endswith(".") and part[0].isupper()  # whole sentences
        assert part in text
    for before, after in zip(parts, parts[1:]):  # each starts with the end of the one before
        first_sentence = after.split(". ")[0] + "."
        assert first_sentence in " ".join(before.split()[-20:])
    joined = set(s.rstrip(".") for p in parts for s in p.split(". "))
    assert len(joined) == 60  # nothing lost
    passages = split_document(Document("long", text))
    assert [p.id for p in passages] == [f"long#{i}" for i in range(1, len(parts) + 1)]


def test_a_sentence_longer_than_a_passage_is_cut_on_words():
    text = " ".join(f"w{i}" for i in range(450))  # no sentence end at all
    parts = split_text(text, words=100, overlap=20)
    assert all(len(p.split()) <= 100 for p in parts)
    assert " ".join(parts).split() == text.split()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text, problem", [("", "empty"), ("   \n\t ", "empty"), ("abc\x00def", "binary"),
                                           (b"\xff\xfe\x00\x01", "binary"), (b"caf\xe9 au lait", "UTF-8"),
                                           (42, "string")])
def test_empty_and_binary_text_is_refused_clearly(text, problem):
    with pytest.raises(DocumentError, match=problem):
        check_text(text, "doc")


def test_bad_files_are_refused_naming_file_and_line(tmp_path):
    (tmp_path / "img.txt").write_bytes(bytes(range(256)))
    with pytest.raises(DocumentError, match=r"img\.txt: a binary file"):
        list(load_documents(tmp_path / "img.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": ""}\n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2 .*empty"):
        list(load_documents(bad))
    bad.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: not valid JSON"):
        list(load_documents(bad))
    bad.write_text('{"id": "a#1", "text": "fine"}\n')
    with pytest.raises(DocumentError, match="must not contain '#'"):
        list(load_documents(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="no .jsonl"):
        list(load_documents(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        list(load_documents(tmp_path / "nope"))


def test_directory_source_reads_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.md").write_text("# Notes\nSome notes about things.")
    write_jsonl(tmp_path / "b.jsonl", [NEW_FACT])
    docs = list(load_documents(tmp_path))
    assert [d.id for d in docs] == ["a", "note:zorbl"]


def test_bad_search_and_build_input(kb, tmp_path, embedder):
    with pytest.raises(KnowledgeError, match="empty"):
        kb.search("  ")
    with pytest.raises(KnowledgeError, match="k must be"):
        kb.search("chess", k=0)
    with pytest.raises(DocumentError, match="given twice"):
        kb.add_documents([NEW_FACT, NEW_FACT])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(KnowledgeError, match="not empty"):
        KnowledgeIndex.build(tmp_path / "taken", [NEW_FACT], embedder)


# ----------------------------------------------------------------------------------------- the index


def test_search_finds_the_named_topic(kb):
    for query, expected in [("Who painted the Mona Lisa?", "wiki:Mona_Lisa"), ("the largest planet", "wiki:Jupiter"),
                            ("how plants make sugar from light", "wiki:Photosynthesis"),
                            ("the highest mountain on Earth", "wiki:Mount_Everest")]:
        hits = kb.search(query, k=3)
        assert hits[0].passage.doc_id == expected, (query, [h.passage.id for h in hits])
        assert hits[0].score > hits[1].score
        assert hits[0].source()["url"].startswith("https://en.wikipedia.org/wiki/")


def test_add_delete_persist_reload(kb, embedder):
    before = len(kb)
    added = kb.add_documents([NEW_FACT])
    assert [p.id for p in added] == ["note:zorbl"] and len(kb) == before + 1
    assert kb.search("giant pumpkin races on a lake", k=1)[0].passage.id == "note:zorbl"
    # a duplicate is refused whole and changes nothing
    with pytest.raises(DuplicateId, match="note:zorbl"):
        kb.add_documents([Document("fresh", "Another fresh fact about otters."), NEW_FACT])
    assert len(kb) == before + 1 and kb.get("fresh") is None
    # a split document deletes by its document id, or passage by passage
    cro = [p.id for p in kb.search("Cro-Magnon early modern humans in Europe", k=10) if p.passage.doc_id == "wiki:Cro-Magnon"]
    assert len(cro) >= 2
    assert kb.delete(cro[0]) == [cro[0]]
    rest = kb.delete("wiki:Cro-Magnon")
    assert cro[0] not in rest and set(cro[1:]) <= set(rest)
    with pytest.raises(UnknownId):
        kb.delete("wiki:Cro-Magnon")
    assert all(h.passage.doc_id != "wiki:Cro-Magnon" for h in kb.search("Cro-Magnon", k=20))
    state = len(kb)
    kb.close()
    reopened = KnowledgeIndex.open(kb.directory, embedder)  # everything was written
    assert len(reopened) == state
    assert reopened.search("giant pumpkin races on a lake", k=1)[0].passage.id == "note:zorbl"
    assert all(h.passage.doc_id != "wiki:Cro-Magnon" for h in reopened.search("Cro-Magnon", k=20))
    reopened.close()


def test_deleted_keys_are_never_reused(kb):
    kb.add_documents([NEW_FACT])
    (old_key, _), = kb.store.keys_of("note:zorbl")
    kb.delete("note:zorbl")
    kb.add_documents([Document("other", "Otters hold hands while they sleep.")])
    (new_key, _), = kb.store.keys_of("other")
    assert new_key > old_key


def test_mismatch_is_refused_with_a_rebuild_message(built, tmp_path, embedder):
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    other = dict(manifest, embedder=dict(manifest["embedder"], name="other-model", fingerprint="0" * 16))
    (copy / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(IndexMismatch, match=r"embedder 'other-model'.*chatbot index build"):
        KnowledgeIndex.open(copy, embedder)
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, counts=dict(manifest["counts"], passages=3))))
    with pytest.raises(IndexMismatch, match=r"disagree.*chatbot index build"):
        KnowledgeIndex.open(copy, embedder)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexMismatch, match="FAISS cannot read"):
        KnowledgeIndex.open(copy, embedder)
    (copy / "index.faiss").unlink()
    with pytest.raises(IndexMismatch, match="index.faiss is missing"):
        KnowledgeIndex.open(copy, embedder)
    with pytest.raises(FileNotFoundError, match="no knowledge index here"):
        KnowledgeIndex.open(tmp_path / "nothing", embedder)


def test_small_corpora_never_hit_a_training_error():
    assert resolve_factory("flat", 10) == "Flat"
    assert resolve_factory("auto", 5_000) == "Flat"
    assert resolve_factory("auto", 1_000_000).startswith("IVF")
    assert resolve_factory("IVF4096,Flat", 100) == "Flat"
    assert resolve_factory("IVF4096,Flat", 10_000) == "IVF256,Flat"
    assert resolve_factory("IVF64,PQ16", 2_000) == "Flat"
    assert resolve_factory("HNSW32", 10) == "HNSW32"


@pytest.mark.parametrize("spec", ["IVF16,Flat", "HNSW16", "IVF4096,PQ8"])
def test_approximate_index_types_add_delete_and_reload(spec, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex.create(32, spec, x, nprobe=16)
    keys = np.arange(2000) * 7 + 11
    index.add(x, keys)
    _, found = index.search(x[:5], 1)
    assert list(found[:, 0]) == list(keys[:5]) or "PQ" in index.factory or index.factory == "Flat"
    index.remove(keys[:5])
    _, found = index.search(x[:5], 10)
    assert not set(found.ravel()) & set(keys[:5])  # deleted ids never come back
    index.save(tmp_path / "i.faiss")
    again = VectorIndex.load(tmp_path / "i.faiss", index.factory, 16, valid_keys=set(keys[5:].tolist()))
    _, found = again.search(x[:5], 10)
    assert not set(found.ravel()) & set(keys[:5])


def test_build_with_an_oversized_ivf_on_a_small_corpus(tmp_path, embedder):
    kb = KnowledgeIndex.build(tmp_path / "ivf", small_wiki(4), embedder, index_type="IVF4096,Flat")
    assert kb.manifest["index"]["factory"] == "Flat"
    assert kb.search("Mona Lisa", 1)[0].passage.id == "wiki:Mona_Lisa"
    kb.close()


# ----------------------------------------------------------------------------------------- concurrency


def test_concurrent_search_while_adding_and_deleting(kb, embedder):
    """Searchers never fail and never see half of a change: a 3-passage document is all there or all gone."""
    sentences = [f"The glimmerfish of lake Oxbow number {i} glows blue at night and eats tiny shrimp." for i in range(24)]
    doc = Document("glimmer", " ".join(sentences), "Glimmerfish")
    passages, vectors = kb.prepare([doc])
    assert len(passages) >= 3
    stop = threading.Event()
    errors: list[BaseException] = []
    seen_counts: set[int] = set()

    def search() -> None:
        query = embedder.embed(["glimmerfish of lake Oxbow glows blue"])
        while not stop.is_set():
            try:
                hits = kb.search_vectors(query, 20)[0]
                with kb._lock:  # the count of glimmer passages in the store at one instant
                    n = len(kb.store.keys_of("glimmer"))
                seen_counts.add(n)
                assert all(h.passage.id != "note:zorbl" or h.passage.text for h in hits)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    def change() -> None:
        try:
            for _ in range(15):
                kb.add_passages(passages, vectors)
                kb.delete("glimmer")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=search) for _ in range(3)] + [threading.Thread(target=change)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen_counts <= {0, len(passages)}
    assert not kb.store.keys_of("glimmer")
    assert len(kb.search("glimmerfish", 5)) == 5


# ----------------------------------------------------------------------------------------- the CLI


def test_cli_build_add_delete_search(tmp_path, capsys):
    from chatbot.cli import main

    source = write_jsonl(tmp_path / "docs.jsonl", small_wiki(5))
    out = tmp_path / "idx"
    assert main(["index", "build", "--source", str(source), "--out", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["passages"] == 5
    assert main(["index", "search", "Mona Lisa", "-k", "2", "--index", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["id"] == "wiki:Mona_Lisa" and first["url"] and first["score"] > 0.5
    write_jsonl(tmp_path / "new.jsonl", [NEW_FACT])
    assert main(["index", "add", str(tmp_path / "new.jsonl"), "--index", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"added": ["note:zorbl"], "passages": 6}
    assert main(["index", "add", str(tmp_path / "new.jsonl"), "--index", str(out), "--no-progress"]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["index", "delete", "note:zorbl", "--index", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == ["note:zorbl"]
    assert main(["index", "delete", "note:zorbl", "--index", str(out)]) == 2
    assert "no passage or document" in capsys.readouterr().err
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    assert main(["index", "add", str(tmp_path / "bin.txt"), "--index", str(out)]) == 2
    assert "binary" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- default KB


@pytest.mark.slow
def test_default_knowledge_base_finds_mona_lisa_first(tmp_path, embedder, monkeypatch):
    from retrieval.default_kb import ensure_default_index, read_seed

    monkeypatch.setenv("CHATBOT_CACHE", str(tmp_path))
    seed = read_seed()
    assert seed is not None, "retrieval/assets/wiki is missing: run `make default-kb`"
    directory = ensure_default_index(embedder, progress=False)
    kb = KnowledgeIndex.open(directory, embedder)
    assert len(kb) == seed["passages"] > 10_000
    hits = kb.search("Mona Lisa", 3)
    assert hits[0].passage.id == "wiki:Mona_Lisa"
    assert ensure_default_index(embedder) == directory  # materialised once, then reused
    kb.close()


# ----------------------------------------------------------------------------------------- grounded data


def test_grounded_training_data_is_synthetic_holds_out_articles_and_cites_its_gold(built, tmp_path, capsys):
    from chatbot.cli import main
    from chatbot.data import jsonl_conversations
    from retrieval.grounded_data import read_examples

    out = tmp_path / "grounded"
    assert main(["index", "training-data", "--index", str(built), "--out", str(out), "--heldout-share", "0.3",
                 "--seed", "1"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["synthetic"] and meta["train_examples"] + meta["heldout_examples"] == 13
    assert meta["heldout_examples"] >= 1
    passages = {json.loads(line)["id"]: json.loads(line) for line in (out / "passages.jsonl").read_text().splitlines()}
    train, heldout = list(read_examples(out / "train.jsonl")), list(read_examples(out / "heldout.jsonl"))
    heldout_articles = set(json.loads((out / "meta.json").read_text())["heldout_articles"])
    assert heldout_articles == {e["article"] for e in heldout}
    for ex in train + heldout:
        assert ex["synthetic"] is True and ex["turns"][-1]["speaker"] == "bot"
        assert set(ex["knowledge"]) <= set(passages) and 1 <= len(ex["knowledge"]) <= 3
        if ex["gold"] is not None:
            assert ex["gold"] in ex["knowledge"]
            reply = ex["turns"][-1]["text"]
            fact = reply.split(". ", 1)[-1] if reply.startswith(("Sure. ", "I do. ")) else reply.split("! ", 1)[-1]
            assert fact in passages[ex["gold"]]["text"]  # the reply states a fact from its gold passage
    for ex in train:  # no held-out article leaks into training, neither as topic nor as a distractor
        assert ex["article"] not in heldout_articles
        assert not any(pid.split("#")[0] in heldout_articles for pid in ex["knowledge"])
    assert all(ex["gold"] is not None for ex in heldout)
    # the files are valid corpora for `chatbot train --data`
    assert len(list(jsonl_conversations(out / "train.jsonl"))) == len(train)
