"""Ratings as data: one row per (item, rater) answer, read from or written to the ratings CSV

    system,item_id,rater_id,sensible,specific

(values 0/1; ``specific`` is 0 or empty when ``sensible`` is 0), so ratings collected anywhere can be
scored, and the rating form's database exports the same rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HEADER = ["system", "item_id", "rater_id", "sensible", "specific"]


class RatingsError(ValueError):
    """A ratings file is malformed; the message is ``FILE:LINE: problem``."""

    def __init__(self, path: str | Path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass(frozen=True)
class Rating:
    system: str
    item_id: str
    rater_id: str
    sensible: bool
    specific: bool  # False whenever sensible is False


def check_consistent(ratings: Iterable[Rating]) -> list[Rating]:
    """One answer per (item, rater); an item belongs to one system; not sensible -> not specific."""
    out, seen, system_of = [], set(), {}
    for r in ratings:
        if r.specific and not r.sensible:
            raise ValueError(f"item {r.item_id!r}, rater {r.rater_id!r}: specific without sensible")
        if (r.item_id, r.rater_id) in seen:
            raise ValueError(f"item {r.item_id!r} rated twice by rater {r.rater_id!r}")
        if system_of.setdefault(r.item_id, r.system) != r.system:
            raise ValueError(f"item {r.item_id!r} appears under systems {system_of[r.item_id]!r} and {r.system!r}")
        seen.add((r.item_id, r.rater_id))
        out.append(r)
    return out


def _flag(value: str, field: str, path, line: int, allow_empty: bool = False) -> bool:
    value = value.strip()
    if value in ("0", "1"):
        return value == "1"
    if allow_empty and value == "":
        return False
    raise RatingsError(path, line, f"{field} must be 0 or 1{' or empty' if allow_empty else ''}, got {value!r}")


def read_ratings_csv(path: str | Path) -> list[Rating]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ratings file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise RatingsError(path, 1, f"not UTF-8 text ({e.reason})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != HEADER:
        raise RatingsError(path, 1, f"the header must be {','.join(HEADER)}, got {','.join(header or [])!r}")
    ratings, seen, system_of = [], {}, {}
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(HEADER):
            raise RatingsError(path, line, f"expected {len(HEADER)} fields ({','.join(HEADER)}), got {len(row)}")
        system, iid, rater = (c.strip() for c in row[:3])
        for name, value in (("system", system), ("item_id", iid), ("rater_id", rater)):
            if not value:
                raise RatingsError(path, line, f"{name} is empty")
        sensible = _flag(row[3], "sensible", path, line)
        specific = _flag(row[4], "specific", path, line, allow_empty=not sensible)
        if specific and not sensible:
            raise RatingsError(path, line, "specific is 1 but sensible is 0 (only a sensible response can be specific)")
        if (iid, rater) in seen:
            raise RatingsError(path, line, f"rater {rater!r} rated item {iid!r} already on line {seen[(iid, rater)]}")
        seen[(iid, rater)] = line
        if system_of.setdefault(iid, (system, line))[0] != system:
            raise RatingsError(path, line, f"item {iid!r} was under system {system_of[iid][0]!r} on line {system_of[iid][1]}")
        ratings.append(Rating(system, iid, rater, sensible, specific))
    if not ratings:
        raise RatingsError(path, 1, "no ratings after the header")
    return ratings


def write_ratings_csv(ratings: Iterable[Rating], out) -> None:
    """Write the CSV to a text stream."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for r in ratings:
        writer.writerow([r.system, r.item_id, r.rater_id, int(r.sensible), int(r.specific)])
