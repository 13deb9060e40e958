"""``chatbot index``: build, add to, delete from and search a knowledge index.

Without ``--index`` the commands work on the default knowledge base (the Wikipedia summaries,
materialised on first use).  With ``--redis-url`` (or ``--data-dir`` for the embedded Redis), ``add``
and ``delete`` go to a running deployment's change log instead, which every worker follows
(``retrieval.live``): the base index (--index, default the Wikipedia one) must be the one the
service runs with; ``search`` then reads what the deployment holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from retrieval.documents import OVERLAP_WORDS, WORDS_PER_PASSAGE


def add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="knowledge index: build, add, delete, search",
                       description="A FAISS knowledge index of passages (docs/knowledge.md).")
    isub = p.add_subparsers(dest="index_command", required=True)

    def common(q: argparse.ArgumentParser, deployment: bool = True) -> None:
        q.add_argument("--index", help="index directory (default: the default knowledge base, Wikipedia summaries)")
        q.add_argument("--embedder", help="sentence-transformers model directory (default: all-MiniLM-L6-v2, bundled)")
        if deployment:
            q.add_argument("--redis-url", default=None,
                           help="act on the running deployment that shares this Redis (its change log) instead of a directory")
            q.add_argument("--data-dir", help="act on the deployment whose embedded Redis lives here (as chatbot serve --data-dir)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    b = isub.add_parser("build", help="build an index directory from documents",
                        description="Split documents into ~100-word passages, embed them and write a self-describing "
                                    "index directory (manifest.json, index.faiss, passages.sqlite).")
    b.add_argument("--source", required=True, help="'wiki' (the bundled Wikipedia summaries), a .jsonl/.json/.txt/.md file, or a directory")
    b.add_argument("--out", required=True, help="the new index directory (must not exist or be empty)")
    b.add_argument("--index-type", default="flat",
                   help="flat (exact, default), auto (by corpus size), or a FAISS factory string: IVF4096,Flat, HNSW32, IVF1024,PQ32")
    b.add_argument("--words", type=int, default=WORDS_PER_PASSAGE, help="words per passage")
    b.add_argument("--overlap", type=int, default=OVERLAP_WORDS, help="words a passage repeats from the one before")
    b.add_argument("--embedder", help="sentence-transformers model directory (default: all-MiniLM-L6-v2, bundled)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_build)

    a = isub.add_parser("add", help="add documents (a file or directory) to an index or a deployment")
    a.add_argument("source", help="a .jsonl/.json/.txt/.md file or a directory of them")
    common(a)
    a.set_defaults(func=run_add)

    d = isub.add_parser("delete", help="delete a passage, or all passages of a document, by id")
    d.add_argument("id", help="a passage id (DOC#n) or a document id")
    common(d)
    d.set_defaults(func=run_delete)

    s = isub.add_parser("search", help="the passages nearest a query")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=5, help="passages to show")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    common(s)
    s.set_defaults(func=run_search)

    t = isub.add_parser("training-data", help="write SYNTHETIC knowledge-grounded conversations (JSONL) from an index",
                        description="Template conversations over the index's articles (retrieval/grounded_data.py): "
                                    "a question about a topic, a reply stating a fact from its passage, the gold passage "
                                    "among retrieved distractors; a share of articles held out for evaluation.")
    t.add_argument("--out", required=True, help="directory for train.jsonl, heldout.jsonl, passages.jsonl, meta.json")
    t.add_argument("--max-articles", type=int, help="use a random sample of this many articles (default: all)")
    t.add_argument("--heldout-share", type=float, default=0.05, help="share of articles held out entirely")
    t.add_argument("--knowledge", type=int, default=3, help="passages per example (gold + distractors)")
    t.add_argument("--seed", type=int, default=0)
    common(t, deployment=False)
    t.set_defaults(func=run_training_data)


def _embedder(args: argparse.Namespace):
    from retrieval.embedder import load_embedder

    return load_embedder(args.embedder)


def _open(args: argparse.Namespace):
    from retrieval.default_kb import ensure_default_index
    from retrieval.knowledge import KnowledgeIndex

    embedder = _embedder(args)
    directory = Path(args.index) if args.index else ensure_default_index(embedder, progress=not args.no_progress)
    return KnowledgeIndex.open(directory, embedder)


def _deployment(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "redis_url", None) or getattr(args, "data_dir", None))


def run_build(args: argparse.Namespace) -> int:
    from retrieval.documents import load_documents
    from retrieval.knowledge import KnowledgeIndex

    kb = KnowledgeIndex.build(args.out, load_documents(args.source), _embedder(args), index_type=args.index_type,
                              words=args.words, overlap=args.overlap, progress=not args.no_progress)
    print(json.dumps({"out": str(kb.directory), **kb.manifest["counts"], "index": kb.manifest["index"]["factory"]}))
    kb.close()
    return 0


def run_add(args: argparse.Namespace) -> int:
    from retrieval.documents import load_documents

    documents = list(load_documents(args.source))
    if _deployment(args):
        result = run_on_deployment(args, lambda log: log.add_documents(documents, progress=not args.no_progress))
    else:
        kb = _open(args)
        passages = kb.add_documents(documents, progress=not args.no_progress)
        result = {"added": [p.id for p in passages], "passages": len(kb)}
        kb.close()
    print(json.dumps(result))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    if _deployment(args):
        result = run_on_deployment(args, lambda log: log.delete(args.id))
    else:
        kb = _open(args)
        result = {"deleted": kb.delete(args.id), "passages": len(kb)}
        kb.close()
    print(json.dumps(result))
    return 0


def run_training_data(args: argparse.Namespace) -> int:
    from retrieval.grounded_data import write_grounded_data

    kb = _open(args)
    meta = write_grounded_data(kb, args.out, seed=args.seed, n_knowledge=args.knowledge,
                               heldout_share=args.heldout_share, max_articles=args.max_articles)
    kb.close()
    print(json.dumps(meta))
    return 0


def run_search(args: argparse.Namespace) -> int:
    if _deployment(args):
        

        hits = run_on_deployment(args, lambda log: log.search(args.query, args.k))
    else:
        kb = _open(args)
        hits = [{"score": round(h.score, 4), **h.passage.to_dict()} for h in kb.search(args.query, args.k)]
        kb.close()
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(json.dumps(hit, ensure_ascii=False))
        else:
            text = hit["text"] if len(hit["text"]) <= 300 else hit["text"][:297] + "..."
            print(f"{rank}. [{hit['score']:.3f}] {hit['id']}  {hit.get('title', '')}  {hit.get('url', '')}\n   {text}")
    if not hits:
        print("no passages", file=sys.stderr)
    return 0



def run_on_deployment(args: Any, action) -> Any:
    """Run ``action(live)`` against the deployment that ``args.redis_url`` / ``args.data_dir`` name:
    a short-lived LiveKnowledge that replays the log, writes the change and waits until it is applied."""
    from retrieval.default_kb import ensure_default_index
    from retrieval.embedder import load_embedder
    from retrieval.live import LiveKnowledge

    async def main() -> Any:
        from chatbot.serve.config import default_data_dir
        from chatbot.serve.redis_backend import open_redis

        data_dir = Path(args.data_dir) if getattr(args, "data_dir", None) else default_data_dir()
        embedder = load_embedder(args.embedder)
        base = Path(args.index) if args.index else ensure_default_index(embedder, progress=not args.no_progress)

        async with open_redis(args.redis_url, data_dir) as redis:
            live = LiveKnowledge(redis, base, embedder, data_dir)
            await live.start()
            try:
                result = await action(live)
            finally:
                await live.close(snapshot=False)
        if isinstance(result, list):
            return [{"score": round(h.score, 4), **h.passage.to_dict()} for h in result]
        return result

    return asyncio.run(main())
