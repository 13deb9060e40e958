"""Rating sets: the items raters judge, in one JSON file that every SSA tool reads and writes.

    {"format": "chatbot-ssa-set", "version": 1, "name": "...", "kind": "static" | "transcripts" | "interactive",
     "decoding": {...DecodingConfig fields...} or null,
     "systems": {"NAME": {"kind": "model" | "human" | "imported", "model": "DIR" or null}},
     "items": [{"id": "...", "system": "NAME", "context": ["oldest turn", ..., "newest turn"], "response": "..."}]}

Items of all systems are stored shuffled together, and an item id is a hash that does not name its
system, so neither the file order nor the id tells a rater who wrote a response.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "chatbot-ssa-set"
VERSION = 1
KINDS = ("static", "transcripts", "interactive")
SYSTEM_KINDS = ("model", "human", "imported")
# Far above any real turn; keeps a hostile set from filling the database or the page.
MAX_TEXT_CHARS = 10_000
MAX_CONTEXT_TURNS = 64


class SetError(ValueError):
    """A rating set is malformed or inconsistent; the message names the file (or source) and the item."""


@dataclass(frozen=True)
class Item:
    id: str
    system: str
    context: tuple[str, ...]
    response: str

    def to_dict(self) -> dict:
        return {"id": self.id, "system": self.system, "context": list(self.context), "response": self.response}


@dataclass
class RatingSet:
    name: str
    kind: str
    items: list[Item]
    systems: dict[str, dict] = field(default_factory=dict)
    decoding: dict | None = None

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "kind": self.kind,
                "decoding": self.decoding, "systems": self.systems, "items": [i.to_dict() for i in self.items]}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # never a half-written set
        return path


def item_id(set_name: str, *parts: object) -> str:
    """An opaque id: a hash of the set and the item's origin, so it does not show the system."""
    return hashlib.sha256("\x1f".join(map(str, (set_name, *parts))).encode()).hexdigest()[:16]


def shuffled(items: list[Item], seed: int) -> list[Item]:
    """Items of every system mixed together in a seeded order."""
    out = sorted(items, key=lambda i: i.id)
    random.Random(seed).shuffle(out)
    return out


def _text(value: object, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise SetError(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:  # a model's reply may be empty; a context turn may not
        raise SetError(f"{where}: empty text")
    if len(value) > MAX_TEXT_CHARS:
        raise SetError(f"{where}: {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    return value


def parse_set(data: object, source: str) -> RatingSet:
    """Validate a decoded set (from a file or an upload); ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise SetError(f"{source}: a rating set is a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise SetError(f"{source}: not a rating set (expected format {FORMAT!r} version {VERSION}); "
                       "make one with `chatbot eval static-set` or `chatbot eval import`")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise SetError(f"{source}: field 'name' must be a non-empty string of at most 200 characters")
    kind = data.get("kind")
    if kind not in KINDS:
        raise SetError(f"{source}: field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    systems = data.get("systems", {})
    if not isinstance(systems, dict):
        raise SetError(f"{source}: field 'systems' must be an object")
    for sys_name, info in systems.items():
        if not isinstance(info, dict) or info.get("kind") not in SYSTEM_KINDS:
            raise SetError(f"{source}: systems[{sys_name!r}] needs 'kind' in {', '.join(SYSTEM_KINDS)}")
    decoding = data.get("decoding")
    if decoding is not None and not isinstance(decoding, dict):
        raise SetError(f"{source}: field 'decoding' must be an object or null")
    raw_items = data.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise SetError(f"{source}: field 'items' must be a non-empty list")
    items, seen = [], set()
    for n, raw in enumerate(raw_items):
        where = f"{source}: items[{n}]"
        if not isinstance(raw, dict):
            raise SetError(f"{where}: expected an object with id, system, context, response")
        for key in ("id", "system", "context", "response"):
            if key not in raw:
                raise SetError(f"{where}: missing field {key!r}")
        iid, system, context = raw["id"], raw["system"], raw["context"]
        if not isinstance(iid, str) or not iid or len(iid) > 100:
            raise SetError(f"{where}: 'id' must be a non-empty string of at most 100 characters")
        if iid in seen:
            raise SetError(f"{where}: duplicate item id {iid!r}")
        seen.add(iid)
        if not isinstance(system, str) or not system or system not in systems:
            raise SetError(f"{where}: 'system' must name one of the set's systems, got {system!r}")
        if not isinstance(context, list) or not context or len(context) > MAX_CONTEXT_TURNS:
            raise SetError(f"{where}: 'context' must be a list of 1..{MAX_CONTEXT_TURNS} turn strings")
        turns = tuple(_text(t, f"{where}.context[{j}]") for j, t in enumerate(context))
        items.append(Item(iid, system, turns, _text(raw["response"], f"{where}.response", allow_empty=True)))
    return RatingSet(name.strip(), kind, items, systems, decoding)


def load_set(path: str | Path) -> RatingSet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such rating set file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SetError(f"{path}: not valid JSON ({e})") from None
    return parse_set(data, str(path))


def system_info(kind: str, model: str | None = None) -> dict:
    return {"kind": kind, "model": model}
