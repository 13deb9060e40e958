"""Helpers for the SSA tests: hand-made rating sets and an in-process rating form on a free port."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from eval.itemset import Item, RatingSet, item_id, shuffled, system_info
from eval.rating_app import RateConfig, start_runner
from eval.ratings_db import RatingsDB

ADMIN_TOKEN = "admin.test-token-0123456789"
WORDS = "tennis football music pizza travel summer winter movies books coffee garden python".split()


def make_set(name: str = "t", systems: tuple[str, ...] = ("alpha", "beta", "gamma"), per_system: int = 4,
             seed: int = 0) -> RatingSet:
    """Items whose responses the simulated rule judges differently: on-topic, generic, broken."""
    rng = random.Random(seed)
    items = []
    for s, system in enumerate(systems):
        for k in range(per_system):
            topic = rng.choice(WORDS)
            context = (f"do you like {topic}?",) if k % 2 else ("hi there", f"i spent the day on {topic}")
            response = [f"yes, {topic} is my favourite thing", "that is nice", "ok", f"{topic} {topic} {topic} {topic}"][(k + s) % 4]
            items.append(Item(item_id(name, system, k), system, context, response))
    return RatingSet(name, "static", shuffled(items, seed), {s: system_info("model" if s != "human" else "human") for s in systems})


@contextlib.asynccontextmanager
async def running_form(tmp_path: Path, *, k: int = 3, sets: tuple[RatingSet, ...] = (), engines: dict | None = None,
                       **config):
    db_path = tmp_path / "ratings.sqlite"
    db = RatingsDB(db_path)
    db.set_admin_token(ADMIN_TOKEN)
    for rating_set in sets:
        db.load_set(rating_set)
    db.close()
    cfg = RateConfig(port=0, db_path=str(db_path), raters_per_item=k, **config)
    runner = await start_runner(cfg, engines=engines if engines is not None else {}, port=0)
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", db_path
    finally:
        await runner.cleanup()
