"""The SSA report: per-system scores with intervals, agreement, and perplexity against SSA.

Writes into one directory: ``report.json`` (every number), ``report.md``, ``report.html`` (no script;
every name and note escaped) and ``ppl_vs_ssa.png`` (perplexity on x, SSA on y, a labelled point per
system with its SSA interval, the least-squares line, and a horizontal reference line for each system
without a perplexity, such as humans or imported bots).
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

import numpy as np

from eval.correlation import fit_ppl_ssa
from eval.ratings import Rating, check_consistent
from eval.scores import DEFAULT_BOOTSTRAP, agreement, item_labels, system_scores

SIMULATED_BANNER = ("These ratings come from SIMULATED raters (a fixed rule, see docs/evaluation.md), "
                    "not from people: the SSA figures measure that rule, not human judgement.")


class PerplexityFileError(ValueError):
    def __init__(self, path, line: int, problem: str):
        super().__init__(f"{path}:{line}: {problem}")


def read_perplexity_csv(path: str | Path) -> dict[str, dict]:
    """``system,perplexity`` (more columns are ignored) -> {system: {"perplexity": float}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such perplexity file")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"system", "perplexity"} <= {h.strip() for h in reader.fieldnames}:
            raise PerplexityFileError(path, 1, "the header needs the columns system,perplexity")
        out: dict[str, dict] = {}
        for row in reader:
            line = reader.line_num
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row["system"]:
                raise PerplexityFileError(path, line, "system is empty")
            try:
                value = float(row["perplexity"])
            except ValueError:
                raise PerplexityFileError(path, line, f"perplexity must be a number, got {row['perplexity']!r}") from None
            if not math.isfinite(value) or value < 1:
                raise PerplexityFileError(path, line, f"perplexity must be a finite number >= 1, got {value}")
            if row["system"] in out:
                raise PerplexityFileError(path, line, f"system {row['system']!r} appears twice")
            out[row["system"]] = {"perplexity": value}
    return out


def compute_report(ratings: list[Rating], perplexities: dict[str, dict], *, title: str = "SSA report",
                   simulated: bool = False, notes: list[str] | None = None, n_boot: int = DEFAULT_BOOTSTRAP,
                   seed: int = 0) -> dict:
    ratings = check_consistent(ratings)
    if not ratings:
        raise ValueError("no ratings to report on")
    labels = item_labels(ratings)
    systems = []
    for score in system_scores(labels, n_boot, seed):
        row = score.to_dict()
        ppl = perplexities.get(score.system, {})
        row["perplexity"] = ppl.get("perplexity")
        row["per_word_perplexity"] = ppl.get("per_word_perplexity")
        systems.append(row)
    with_ppl = [s for s in systems if s["perplexity"] is not None]
    fit = fit_ppl_ssa([s["perplexity"] for s in with_ppl], [s["ssa"] for s in with_ppl], n_boot, seed)
    fit["fitted_systems"] = [s["system"] for s in with_ppl]
    unknown = sorted(set(perplexities) - {s["system"] for s in systems})
    return {"title": title, "simulated_raters": simulated, "notes": list(notes or []),
            "ratings": len(ratings), "items": len(labels), "raters": len({r.rater_id for r in ratings}),
            "systems": systems, "agreement": agreement(ratings, labels), "fit": fit,
            "perplexity_without_ratings": unknown,
            "method": {"label": "strict majority of an item's raters; not sensible counts as not specific",
                       "interval": "percentile bootstrap 95% over items (systems, for r)",
                       "bootstrap_samples": n_boot, "seed": seed}}


# -------------------------------------------------------------------------------------- rendering

def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(row: dict, key: str) -> str:
    lo, hi = row[f"{key}_ci"]
    return f"{row[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["system", "items", "ratings", "sensibleness [95% CI]", "specificity [95% CI]", "SSA [95% CI]",
            "perplexity", "per-word ppl"]
    rows = [[s["system"], str(s["items"]), str(s["ratings"]), _ci(s, "sensibleness"), _ci(s, "specificity"),
             _ci(s, "ssa"), _num(s["perplexity"], 2), _num(s["per_word_perplexity"], 2)] for s in report["systems"]]
    return head, rows


def fit_line(report: dict) -> str:
    fit = report["fit"]
    if fit["pearson_r"] is None:
        return f"Perplexity vs SSA over {fit['systems']} systems: {fit.get('note', 'not defined')}."
    ci = fit["pearson_r_ci"]
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return (f"Perplexity vs SSA over {fit['systems']} systems ({', '.join(fit['fitted_systems'])}): "
            f"Pearson r = {fit['pearson_r']:.3f}{ci_text} (bootstrap 95% over systems), R^2 = {fit['r2']:.3f}, "
            f"Spearman rho = {fit['spearman_rho']:.3f}, SSA = {fit['slope']:.4f} x perplexity + {fit['intercept']:.3f}.")


def agreement_lines(report: dict) -> list[str]:
    a = report["agreement"]
    return [f"{label}: Krippendorff's alpha (nominal) {_num(a[label]['krippendorff_alpha'])}, "
            f"unanimous items {_num(a[label]['unanimous_share'])}" for label in ("sensible", "specific")] + \
           [f"items with two or more raters: {a['items_with_2plus_raters']}"]


def render_markdown(report: dict) -> str:
    head, rows = table_rows(report)
    lines = [f"# {report['title']}", ""]
    if report["simulated_raters"]:
        lines += [f"> **{SIMULATED_BANNER}**", ""]
    lines += [f"- {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"{report['items']} items, {report['ratings']} ratings by {report['raters']} raters.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", "## Agreement", ""] + [f"- {line}" for line in agreement_lines(report)]
    lines += ["", "## Perplexity vs SSA", "", fit_line(report), "", "![perplexity vs SSA](ppl_vs_ssa.png)", ""]
    return "\n".join(lines)


def render_html(report: dict) -> str:
    e = html.escape
    head, rows = table_rows(report)
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(report['title'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:auto;padding:1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem}"
             ".banner{background:#fff3cd;border:1px solid #e0c060;padding:.6rem}</style></head><body>",
             f"<h1>{e(report['title'])}</h1>"]
    if report["simulated_raters"]:
        parts.append(f'<p class="banner"><strong>{e(SIMULATED_BANNER)}</strong></p>')
    if report["notes"]:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append(f"<p>{report['items']} items, {report['ratings']} ratings by {report['raters']} raters.</p>")
    parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</tbody></table><h2>Agreement</h2><ul>")
    parts += [f"<li>{e(line)}</li>" for line in agreement_lines(report)]
    parts += ["</ul><h2>Perplexity vs SSA</h2>", f"<p>{e(fit_line(report))}</p>",
              '<img src="ppl_vs_ssa.png" alt="perplexity vs SSA scatter" width="720">', "</body></html>", ""]
    return "\n".join(parts)


def plot_ppl_vs_ssa(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=100)
    with_ppl = [s for s in report["systems"] if s["perplexity"] is not None]
    without = [s for s in report["systems"] if s["perplexity"] is None]
    for s in with_ppl:
        lo, hi = s["ssa_ci"]
        ax.errorbar(s["perplexity"], s["ssa"], yerr=[[s["ssa"] - lo], [hi - s["ssa"]]], fmt="o", color="C0", capsize=3)
        ax.annotate(s["system"], (s["perplexity"], s["ssa"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    fit = report["fit"]
    xs = [s["perplexity"] for s in with_ppl]
    log_x = bool(xs) and max(xs) / min(xs) > 5  # a ladder from seconds of training to a real model spans decades
    if fit["slope"] is not None:
        grid = np.geomspace(min(xs), max(xs), 100) if log_x else np.linspace(min(xs), max(xs), 2)
        ax.plot(grid, fit["slope"] * grid + fit["intercept"], color="C1",
                label=f"least squares: r = {fit['pearson_r']:.2f}, R$^2$ = {fit['r2']:.2f}")
    for k, s in enumerate(without):
        ax.axhline(s["ssa"], linestyle="--", color=f"C{2 + k % 7}", label=f"{s['system']} (no perplexity)")
    if log_x:
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("perplexity (per token, held-out)" + (", log scale; the fit is linear" if log_x else ""))
    ax.set_ylabel("SSA")
    title = "Perplexity vs SSA" + (" (SIMULATED raters)" if report["simulated_raters"] else "")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (out / "report.html").write_text(render_html(report), encoding="utf-8")
    plot_ppl_vs_ssa(report, out / "ppl_vs_ssa.png")
    return out
