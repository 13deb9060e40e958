"""Perplexity against SSA over systems: Pearson r, R^2 of the least-squares line, Spearman rho, the
line itself, and a seeded bootstrap 95% interval on r (systems resampled with replacement)."""

from __future__ import annotations

import numpy as np
from scipy import stats

MIN_SYSTEMS = 3  # with two points any line fits exactly: r = +-1 says nothing


def fit_ppl_ssa(perplexity: list[float], ssa: list[float], n_boot: int = 2000, seed: int = 0) -> dict:
    x, y = np.asarray(perplexity, dtype=float), np.asarray(ssa, dtype=float)
    out: dict = {"systems": len(x), "pearson_r": None, "r2": None, "spearman_rho": None, "slope": None,
                 "intercept": None, "pearson_r_ci": None, "bootstrap_valid": 0}
    if len(x) < MIN_SYSTEMS:
        out["note"] = f"needs at least {MIN_SYSTEMS} systems with both a perplexity and an SSA"
        return out
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = "perplexity or SSA is the same for every system: no correlation is defined"
        return out
    line = stats.linregress(x, y)
    r = float(stats.pearsonr(x, y).statistic)
    out.update(pearson_r=r, r2=r * r, spearman_rho=float(stats.spearmanr(x, y).statistic),
               slope=float(line.slope), intercept=float(line.intercept))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    xs, ys = x[idx], y[idx]
    valid = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)  # a resample of one repeated point has no r
    xs, ys = xs[valid], ys[valid]
    xc, yc = xs - xs.mean(axis=1, keepdims=True), ys - ys.mean(axis=1, keepdims=True)
    rs = (xc * yc).sum(axis=1) / np.sqrt((xc ** 2).sum(axis=1) * (yc ** 2).sum(axis=1))
    rs = np.clip(rs, -1.0, 1.0)  # rounding can step just past +-1
    out["bootstrap_valid"] = int(valid.sum())
    if len(rs):
        lo, hi = np.percentile(rs, [2.5, 97.5])
        out["pearson_r_ci"] = [float(lo), float(hi)]
    return out
