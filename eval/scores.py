"""SSA scores from ratings (Meena's definitions, ../shared/docs/meena.md):

- an item is **sensible** when a strict majority of its raters said sensible, and **specific** when a
  strict majority said specific (a rater who said "not sensible" counts as "not specific"); a tie is
  not a majority;
- per system, sensibleness and specificity are the fractions of its items that are sensible / specific,
  SSA their mean, each with a seeded percentile-bootstrap 95% interval over the system's items;
- agreement: Krippendorff's alpha (nominal) per label over all items, and the share of unanimous items
  among those with two or more raters.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from eval.ratings import Rating

DEFAULT_BOOTSTRAP = 2000


@dataclass(frozen=True)
class ItemLabel:
    item_id: str
    system: str
    raters: int
    sensible_votes: int
    specific_votes: int

    @property
    def sensible(self) -> bool:
        return 2 * self.sensible_votes > self.raters

    @property
    def specific(self) -> bool:
        return 2 * self.specific_votes > self.raters


@dataclass(frozen=True)
class SystemScore:
    system: str
    items: int
    ratings: int
    sensibleness: float
    specificity: float
    ssa: float
    sensibleness_ci: tuple[float, float]
    specificity_ci: tuple[float, float]
    ssa_ci: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def item_labels(ratings: Iterable[Rating]) -> list[ItemLabel]:
    votes: dict[str, list] = {}
    for r in ratings:
        entry = votes.setdefault(r.item_id, [r.system, 0, 0, 0])
        entry[1] += 1
        entry[2] += int(r.sensible)
        entry[3] += int(r.sensible and r.specific)
    return [ItemLabel(iid, s, n, sens, spec) for iid, (s, n, sens, spec) in sorted(votes.items())]


def system_seed(seed: int, system: str) -> int:
    """Each system resamples from its own stream, so adding a system leaves the others' intervals alone."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{system}".encode()).digest()[:8], "big")


def system_scores(labels: list[ItemLabel], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> list[SystemScore]:
    by_system: dict[str, list[ItemLabel]] = defaultdict(list)
    for label in labels:
        by_system[label.system].append(label)
    out = []
    for system in sorted(by_system):
        rows = by_system[system]
        sens = np.array([lab.sensible for lab in rows], dtype=float)
        spec = np.array([lab.specific for lab in rows], dtype=float)
        ssa = (sens + spec) / 2  # the mean of per-item averages is the average of the two fractions
        rng = np.random.default_rng(system_seed(seed, system))
        # One set of resampled items for all three figures, so their intervals describe the same resamples.
        idx = rng.integers(0, len(rows), size=(n_boot, len(rows)))
        cis = [tuple(float(x) for x in np.percentile(v[idx].mean(axis=1), [2.5, 97.5])) for v in (sens, spec, ssa)]
        out.append(SystemScore(system, len(rows), sum(lab.raters for lab in rows), float(sens.mean()),
                               float(spec.mean()), float(ssa.mean()), *cis))
    return out


def krippendorff_alpha(ratings: list[Rating], label: str) -> float | None:
    """Nominal alpha of one label ('sensible' or 'specific') over raters x items; None when undefined
    (fewer than two values in the data, or no item with two raters)."""
    import krippendorff

    raters = sorted({r.rater_id for r in ratings})
    items = sorted({r.item_id for r in ratings})
    row, col = {r: i for i, r in enumerate(raters)}, {i: j for j, i in enumerate(items)}
    data = np.full((len(raters), len(items)), np.nan)
    for r in ratings:
        data[row[r.rater_id], col[r.item_id]] = float(r.sensible and r.specific) if label == "specific" else float(r.sensible)
    pairable = (~np.isnan(data)).sum(axis=0) >= 2
    values = set(data[:, pairable][~np.isnan(data[:, pairable])].tolist())
    if not pairable.any() or len(values) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def agreement(ratings: list[Rating], labels: list[ItemLabel]) -> dict:
    multi = [lab for lab in labels if lab.raters >= 2]

    def unanimous(votes_of) -> float | None:
        if not multi:
            return None
        return sum(votes_of(lab) in (0, lab.raters) for lab in multi) / len(multi)

    return {
        "items_with_2plus_raters": len(multi),
        "sensible": {"krippendorff_alpha": krippendorff_alpha(ratings, "sensible"),
                     "unanimous_share": unanimous(lambda lab: lab.sensible_votes)},
        "specific": {"krippendorff_alpha": krippendorff_alpha(ratings, "specific"),
                     "unanimous_share": unanimous(lambda lab: lab.specific_votes)},
    }
