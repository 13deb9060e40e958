"""SSA statistics against hand-computed values: majority rules and ties, SSA, bootstrap intervals,
Krippendorff's alpha, unanimity, and the perplexity-SSA fit (r, R^2, rho, line)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.correlation import fit_ppl_ssa
from eval.ratings import Rating
from eval.scores import agreement, item_labels, krippendorff_alpha, system_scores


def r(system, item, rater, sensible, specific=False):
    return Rating(system, item, rater, bool(sensible), bool(sensible and specific))


def test_strict_majority_and_ties() -> None:
    ratings = [
        # i1: 3 of 5 sensible, 3 specific -> sensible, specific
        *(r("s", "i1", f"r{k}", 1, 1) for k in range(3)), r("s", "i1", "r3", 0), r("s", "i1", "r4", 0),
        # i2: 2 of 4 sensible: a tie is no majority
        r("s", "i2", "r0", 1, 1), r("s", "i2", "r1", 1, 1), r("s", "i2", "r2", 0), r("s", "i2", "r3", 0),
        # i3: all 3 sensible, 1 specific -> sensible, not specific
        r("s", "i3", "r0", 1, 1), r("s", "i3", "r1", 1, 0), r("s", "i3", "r2", 1, 0),
    ]
    labels = {lab.item_id: lab for lab in item_labels(ratings)}
    assert (labels["i1"].sensible, labels["i1"].specific) == (True, True)
    assert (labels["i2"].sensible, labels["i2"].specific) == (False, False)
    assert (labels["i3"].sensible, labels["i3"].specific) == (True, False)


def test_not_sensible_counts_as_not_specific() -> None:
    # A CSV may carry specific=1 with sensible=0 only if someone bypassed the checks; the label ignores it.
    ratings = [Rating("s", "i", "a", False, True), Rating("s", "i", "b", True, True), Rating("s", "i", "c", False, True)]
    (label,) = item_labels(ratings)
    assert label.specific_votes == 1 and not label.specific


def test_ssa_per_system_and_intervals() -> None:
    # System x: sensible labels [1, 1, 0, 1], specific [1, 0, 0, 0] (one rater each).
    ratings = [r("x", "a", "p", 1, 1), r("x", "b", "p", 1, 0), r("x", "c", "p", 0), r("x", "d", "p", 1, 0),
               r("y", "e", "p", 1, 1), r("y", "f", "p", 1, 1)]
    scores = {s.system: s for s in system_scores(item_labels(ratings), n_boot=500, seed=3)}
    x = scores["x"]
    assert (x.items, x.sensibleness, x.specificity, x.ssa) == (4, 0.75, 0.25, 0.5)
    assert x.ssa_ci[0] <= x.ssa <= x.ssa_ci[1] and x.ssa_ci[0] < x.ssa_ci[1]
    assert scores["y"].ssa == 1.0 and scores["y"].ssa_ci == (1.0, 1.0)  # no variation to resample
    again = {s.system: s for s in system_scores(item_labels(ratings), n_boot=500, seed=3)}
    assert again["x"].ssa_ci == x.ssa_ci  # seeded
    # A system's interval does not depend on which other systems are present.
    alone = system_scores(item_labels([q for q in ratings if q.system == "x"]), n_boot=500, seed=3)[0]
    assert alone.ssa_ci == x.ssa_ci


def test_bootstrap_interval_matches_a_direct_resampling() -> None:
    ratings = [r("x", f"i{k}", "p", k % 3 != 0, k % 2 == 0) for k in range(30)]
    score = system_scores(item_labels(ratings), n_boot=4000, seed=1)[0]
    # The binomial standard error of the sensibleness fraction p = 20/30: the interval is about +-1.96 se.
    p = 20 / 30
    se = math.sqrt(p * (1 - p) / 30)
    lo, hi = score.sensibleness_ci
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.05


def test_krippendorff_alpha_hand_computed() -> None:
    # Two raters, four items: A = 1 1 0 0, B = 1 0 0 0.  Coincidences o00 = 4, o01 = o10 = 1, o11 = 2;
    # n0 = 5, n1 = 3, n = 8; D_o = 2/8, D_e = 2*5*3/(8*7); alpha = 1 - D_o/D_e = 8/15.
    ratings = [r("s", i, "A", a) for i, a in zip("wxyz", [1, 1, 0, 0])] + \
              [r("s", i, "B", b) for i, b in zip("wxyz", [1, 0, 0, 0])]
    assert krippendorff_alpha(ratings, "sensible") == pytest.approx(8 / 15)
    # Perfect agreement on two values gives 1; one value only: undefined.
    same = [r("s", i, rater, v) for i, v in zip("wxyz", [1, 1, 0, 0]) for rater in "AB"]
    assert krippendorff_alpha(same, "sensible") == pytest.approx(1.0)
    assert krippendorff_alpha([r("s", i, rater, 1) for i in "wx" for rater in "AB"], "sensible") is None


def test_unanimous_share() -> None:
    ratings = [r("s", "i1", "a", 1, 1), r("s", "i1", "b", 1, 1),      # unanimous on both
               r("s", "i2", "a", 1, 0), r("s", "i2", "b", 1, 1),      # sensible unanimous only
               r("s", "i3", "a", 0), r("s", "i3", "b", 1, 0),         # specific unanimous (both 0) only
               r("s", "i4", "a", 1)]                                   # one rater: not counted
    result = agreement(ratings, item_labels(ratings))
    assert result["items_with_2plus_raters"] == 3
    assert result["sensible"]["unanimous_share"] == pytest.approx(2 / 3)
    assert result["specific"]["unanimous_share"] == pytest.approx(2 / 3)


def test_fit_hand_computed() -> None:
    # x = 10, 20, 30; y = 1/2, 2/5, 1/10: Sxx = 200, Sxy = -4, Syy = 13/150
    # slope = -0.02, intercept = 1/3 + 0.4 = 11/15, r^2 = 16 / (200 * 13/150) = 12/13, rho = -1.
    fit = fit_ppl_ssa([10, 20, 30], [0.5, 0.4, 0.1], n_boot=1000, seed=0)
    assert fit["slope"] == pytest.approx(-0.02)
    assert fit["intercept"] == pytest.approx(11 / 15)
    assert fit["r2"] == pytest.approx(12 / 13)
    assert fit["pearson_r"] == pytest.approx(-math.sqrt(12 / 13))
    assert fit["spearman_rho"] == pytest.approx(-1.0)
    lo, hi = fit["pearson_r_ci"]
    assert -1.0 <= lo <= hi <= 1.0 and fit["bootstrap_valid"] > 0


def test_fit_needs_three_distinct_systems() -> None:
    assert fit_ppl_ssa([10, 20], [0.5, 0.4])["pearson_r"] is None
    assert "no correlation" in fit_ppl_ssa([10, 20, 30], [0.5, 0.5, 0.5])["note"]


def test_fit_bootstrap_skips_degenerate_resamples() -> None:
    x, y = np.array([10.0, 12, 15, 20, 30]), np.array([0.6, 0.55, 0.5, 0.42, 0.3])
    fit = fit_ppl_ssa(x, y, n_boot=2000, seed=5)
    assert fit["bootstrap_valid"] < 2000  # some resamples repeat one system only
    assert fit["pearson_r_ci"][1] <= 1.0 and fit["pearson_r"] < -0.9
