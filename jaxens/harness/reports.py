"""Report writers of both evaluations: the result container, Markdown tables, JSON and PNG plots.

* :class:`EvalResult`: rows (one dict per table line), the configuration and the measurement
  context; written as JSON by :func:`write_json` (non-finite floats as ``"inf"``/``"-inf"``/``"nan"``).
* :func:`eval_table`: the token-level table of :mod:`jaxens.harness.evaluate` (NLL, PPL, top-1,
  ECE, solver columns); :func:`bpb_table`: the bits-per-byte table of
  :mod:`jaxens.harness.eval_cross`.
* :func:`plot_eval` / :func:`plot_bpb`: horizontal bar charts (need matplotlib,
  ``pip install 'jaxens[plot]'``; without it they warn and return ``False``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass
class EvalResult:
    """Rows of the table (dicts), the configuration and the measurement context."""

    rows: list[dict]
    config: dict
    meta: dict

    def to_json(self) -> dict:
        return {"config": self.config, "meta": self.meta, "rows": self.rows}

    def markdown(self) -> str:
        return eval_table(self.rows)


def progress_bar(**kw):
    """A tqdm bar on stderr."""
    return tqdm(file=sys.stderr, **kw)


# ---------------------------------------------------------------- Markdown


def fmt(x, spec: str) -> str:
    """``format(x, spec)``; ``"-"`` for None/NaN, ``"inf"`` for infinities."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def markdown(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _dnll(r: dict) -> str:
    """``Δ [ci_low, ci_high]`` (the paired bootstrap interval), else ``Δ ± s.e.``."""
    d, se = r.get("delta", r.get("dnll")), r.get("dnll_se")
    if d is None:
        return "-"
    if isinstance(d, float) and math.isinf(d):
        return "inf"
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is not None and hi is not None:
        return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    return f"{d:+.4f} ± {se:.4f}" if se is not None and se == se else f"{d:+.4f}"


def eval_table(rows: Sequence[dict]) -> str:
    """The evaluation table in Markdown (one line per combiner)."""
    head = ("combiner", "NLL", "ΔNLL vs tuned [95% CI]", "PPL", "inf rows", "NLL finite", "top-1", "ECE", "infeasible",
            "not conv.", "iters", "lambda", "tok/s")
    lines = []
    for r in rows:
        if "nll" not in r:
            lines.append([r["combiner"]] + ["-"] * (len(head) - 1))
            continue
        lines.append([
            r["combiner"],
            fmt(r["nll"], ".4f"),
            _dnll(r),
            fmt(r["ppl"], ".2f"),
            f"{r['inf_rows']}/{r['rows']}",
            fmt(r["nll_finite"], ".4f"),
            fmt(r["top1"], ".3f"),
            fmt(r["ece"], ".3f"),
            fmt(r.get("infeasible"), ".2f"),
            fmt(r.get("not_converged"), ".2f"),
            fmt(r.get("iters"), ".1f"),
            fmt(r.get("lam"), ".3g"),
            fmt(r.get("tok_s"), ".1f"),
        ])
    return markdown(head, lines)


def bpb_table(rows: Sequence[dict], texts: Sequence[str] = ()) -> str:
    """The bits-per-byte table in Markdown (one line per member / method)."""
    head = ["combiner", "bpb", "zero-prob", "bpb smoothed (λ)"] + [f"bpb {t}" for t in texts] + \
        ["bytes", "tokens", "tok/s"]
    lines = []
    for r in rows:
        sm = "-" if r.get("bpb_smoothed") is None else f"{fmt(r['bpb_smoothed'], '.4f')} ({r['lam']:g})"
        cells = [r["combiner"], fmt(r["bpb"], ".4f"), str(r.get("zero", 0)), sm]
        cells += [fmt(r.get("per_text", {}).get(t), ".4f") for t in texts]
        cells += [str(r["bytes"]), "-" if r.get("tokens") is None else str(r["tokens"]), fmt(r.get("tok_s"), ".1f")]
        lines.append(cells)
    return markdown(head, lines)


# ---------------------------------------------------------------- JSON


def json_safe(x):
    """``x`` with numpy scalars as Python numbers and non-finite floats as strings (nested)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(json_safe(result.to_json()), indent=2) + "\n")


# ---------------------------------------------------------------- plots


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'jaxens[plot]'); skipping the plot", stacklevel=3)
        return None
    return plt


def _save(plt, fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_eval(result: EvalResult, path: str | os.PathLike) -> bool:
    """Bar chart of test NLL (finite rows; hatched where some rows were infinite) and top-1 accuracy.

    Returns False (with a warning) when matplotlib is not installed (``pip install jaxens[plot]``).
    """
    plt = _pyplot()
    if plt is None:
        return False
    rows = [r for r in result.rows if "nll" in r]
    labels = [r["combiner"] for r in rows]
    nll = [r["nll_finite"] if r["nll_finite"] == r["nll_finite"] else 0.0 for r in rows]
    acc = [r["top1"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 1.5), sharey=True)
    bars = axes[0].barh(y, nll, color=["tab:red" if r["inf_rows"] else "tab:blue" for r in rows])
    for b, r in zip(bars, rows):
        if r["inf_rows"]:
            b.set_hatch("//")
    axes[0].set_xlabel("test NLL per token (finite rows; red: some rows have p(obs)=0)")
    axes[1].barh(y, acc, color="tab:green")
    axes[1].set_xlabel("top-1 accuracy")
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    best = min(r["nll"] for r in rows)
    axes[0].axvline(best, color="k", lw=0.8, ls="--")
    m = result.meta
    fig.suptitle(f"jaxens eval: {', '.join(m['members'])}; {m['test_rows']} test positions", fontsize=9)
    return _save(plt, fig, path)


def plot_bpb(result: EvalResult, path: str | os.PathLike) -> bool:
    """Bar chart of bits per byte (hatched red: infinite, the smoothed value drawn)."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = result.rows
    vals = [r["bpb"] if math.isfinite(r["bpb"]) else r["bpb_smoothed"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    colors = {"member": "tab:gray", "cross": "tab:blue", "word-mixture": "tab:green"}
    bars = ax.barh(y, vals, color=[colors.get(r["kind"], "tab:blue") if math.isfinite(r["bpb"]) else "tab:red"
                                   for r in rows])
    for b, r in zip(bars, rows):
        if not math.isfinite(r["bpb"]):
            b.set_hatch("//")
    for yy, v in zip(y, vals):
        ax.text(v, yy, f" {v:.3f}", va="center", fontsize=7)
    ax.set_yticks(y, [r["combiner"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits per byte (red hatched: some p(obs)=0, smoothed value shown)")
    m = result.meta
    fig.suptitle(f"jaxens eval (cross-vocabulary): {', '.join(m['members'])}; {m['bytes']} bytes of "
                 f"{', '.join(m['texts'])}", fontsize=8)
    return _save(plt, fig, path)
