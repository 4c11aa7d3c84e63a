r"""PNG plots of both evaluations (``jaxens eval --plot``; need matplotlib: ``pip install 'jaxens[plot]'``).

Each combiner is a point with its 95 % interval on an axis zoomed to the finite values (not from
0, which would hide the differences that matter); a combiner whose score is infinite (some
observed token got probability 0) is drawn as a red ``inf`` marker at the right edge with the
number of such positions, never as a finite bar.  Reference lines are labelled in a legend.

Intervals, in order of preference (read defensively from the rows):

1. an interval the row carries: ``nll_ci_low`` / ``nll_ci_high`` or ``nll_ci = [lo, hi]`` (of the
   NLL), or ``ci_low`` / ``ci_high`` (what :func:`jaxens.harness.evaluate.metrics` writes: the
   paired bootstrap interval of the difference ``delta`` to the tuned reference) shifted onto
   the row's NLL;
2. a percentile bootstrap over per-position values the row carries (``nll_per_position`` or
   ``_lt``, log-probabilities of the observed tokens): :math:`B` resamples of the positions, the
   2.5 and 97.5 percentiles of the resampled means (:func:`bootstrap_interval`);
3. the paired standard error ``dnll_se``: :math:`\mathrm{nll} \pm 1.96\,\mathrm{se}` (the
   difference to the tuned reference, on the same positions).

Top-1 accuracy gets the normal interval :math:`a \pm 1.96 \sqrt{a(1-a)/n}`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from jaxtyping import ArrayLike

from jaxens.harness.reports import EvalResult

PLOT_INSTALL = "pip install 'jaxens[plot]'"
Z95 = 1.959964


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; ``ImportError`` naming ``pip install 'jaxens[plot]'``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib, which is not installed: {PLOT_INSTALL}") from e
    return plt


def bootstrap_interval(values: ArrayLike | Sequence[float], *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    r"""95 % percentile bootstrap interval of the mean of ``values``: the 2.5 / 97.5 percentiles of
    :math:`\bar x^{*b} = \frac1n \sum_k x_{I_{bk}}`, :math:`I_{bk}` uniform on the positions.

    Example::

        lo, hi = bootstrap_interval(-np.asarray(logp_observed))   # an interval of the NLL
    """
    x = np.asarray(values, np.float64)
    if x.size < 2 or not np.all(np.isfinite(x)):
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _pair(r: dict, lo: str, hi: str):
    a, b = r.get(lo), r.get(hi)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(a) and math.isfinite(b):
        return float(a), float(b)
    return None


def _listed(r: dict, key: str):
    v = r.get(key)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _pair({"a": v[0], "b": v[1]}, "a", "b")
    return None


def nll_interval(r: dict) -> tuple[tuple[float, float] | None, str]:
    """``((lo, hi), source)`` for a row's NLL (see the module doc), ``(None, "")`` when none applies."""
    if (ci := _pair(r, "nll_ci_low", "nll_ci_high") or _listed(r, "nll_ci")) is not None:
        return ci, "carried"
    d, nll = r.get("delta", r.get("dnll")), r.get("nll")
    shift = nll - d if isinstance(d, float) and math.isfinite(d) and math.isfinite(nll) else None
    dci = _pair(r, "ci_low", "ci_high")
    if dci is not None and shift is not None:
        return (dci[0] + shift, dci[1] + shift), "carried"
    per = r.get("nll_per_position")
    if per is None and r.get("_lt") is not None:
        per = -np.asarray(r["_lt"], np.float64)
    if per is not None:
        ci = bootstrap_interval(per)
        if math.isfinite(ci[0]):
            return ci, "bootstrap"
    se = r.get("dnll_se")
    if isinstance(se, float) and math.isfinite(se) and math.isfinite(nll):
        return (nll - Z95 * se, nll + Z95 * se), "paired s.e."
    return None, ""


def _limits(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    return lo - pad, hi + pad


def _dots(ax, y, vals, intervals, infinite, labels_inf, color):
    """Points with horizontal error bars; infinite rows as red ``inf`` markers at the right edge."""
    finite = [v for v, inf in zip(vals, infinite) if not inf]
    ends = finite + [x for iv in intervals if iv is not None for x in iv]
    lo, hi = _limits(ends) if ends else (0.0, 1.0)
    edge = hi + 0.12 * (hi - lo)
    for yy, v, iv, inf, lab in zip(y, vals, intervals, infinite, labels_inf):
        if inf:
            ax.plot([edge], [yy], marker=">", color="tab:red", ms=7, ls="none")
            ax.text(edge, yy, f"inf ({lab})  ", va="center", ha="right", fontsize=7, color="tab:red")
            continue
        err = None if iv is None else [[v - iv[0]], [iv[1] - v]]
        ax.errorbar([v], [yy], xerr=err, fmt="o", color=color, ms=4, capsize=2, lw=1)
    ax.set_xlim(lo, edge + 0.05 * (hi - lo))
    ax.grid(axis="x", alpha=0.3)


def plot_eval(result: EvalResult, path: str | os.PathLike) -> bool:
    """Test NLL per combiner (95 % intervals, ``inf`` markers, best-member and tuned-reference
    lines) and top-1 accuracy, on zoomed axes.  ``ImportError`` without matplotlib."""
    plt = pyplot()
    rows = [r for r in result.rows if "nll" in r]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 2.0), sharey=True,
                             gridspec_kw={"width_ratios": [3, 2]})
    nll = [float(r["nll"]) for r in rows]
    infinite = [not math.isfinite(v) for v in nll]
    found = [nll_interval(r) for r in rows]
    _dots(axes[0], y, nll, [c for c, _ in found], infinite,
          [f"{r['inf_rows']}/{r['rows']} positions p(obs)=0" for r in rows], "tab:blue")
    sources = sorted({s for _, s in found if s})
    axes[0].set_xlabel("test NLL per token (lower is better); 95 % interval: " + (", ".join(sources) or "none"))
    members = [r for r in rows if r.get("kind") == "member" and math.isfinite(r["nll"])]
    if members:
        best = min(members, key=lambda r: r["nll"])
        axes[0].axvline(best["nll"], color="k", lw=0.8, ls="--", label=f"best member ({best['combiner']}): "
                        f"{best['nll']:.3f}")
    ref = next((r for r in rows if r["combiner"] == result.meta.get("reference")), None)
    if ref is not None:
        axes[0].axvline(ref["nll"], color="tab:purple", lw=0.8, ls=":", label=f"tuned reference ({ref['combiner']}): "
                        f"{ref['nll']:.3f}")
    if members or ref is not None:
        axes[0].legend(fontsize=7, loc="lower right")
    acc = [float(r["top1"]) for r in rows]
    half = [Z95 * math.sqrt(a * (1 - a) / r["rows"]) if r.get("rows") else None for a, r in zip(acc, rows)]
    acc_ci = [None if h is None else (max(0.0, a - h), min(1.0, a + h)) for a, h in zip(acc, half)]
    _dots(axes[1], y, acc, acc_ci, [False] * len(rows), [""] * len(rows), "tab:green")
    axes[1].set_xlabel("top-1 accuracy (higher is better; 95 % interval)")
    axes[0].set_yticks(y, [r["combiner"] for r in rows], fontsize=7)
    axes[0].invert_yaxis()
    m = result.meta
    fig.suptitle(f"jaxens eval: {', '.join(m.get('members', []))}; {m.get('test_rows', '?')} test positions "
                 "(axes zoomed, not from 0)", fontsize=9)
    return _save(plt, fig, path)


def plot_bpb(result: EvalResult, path: str | os.PathLike) -> bool:
    """Bits per byte per member / method (zoomed; infinite rows as ``inf`` markers with their
    smoothed value in the label; the best member labelled).  ``ImportError`` without matplotlib."""
    plt = pyplot()
    rows = result.rows
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.8))
    vals = [float(r["bpb"]) for r in rows]
    infinite = [not math.isfinite(v) for v in vals]
    labels = [f"{r.get('zero', '?')} zero-prob; smoothed {r['bpb_smoothed']:.3f}" if r.get("bpb_smoothed") is not None
              else f"{r.get('zero', '?')} zero-prob" for r in rows]
    intervals = [_pair(r, "bpb_ci_low", "bpb_ci_high") or _listed(r, "bpb_ci") for r in rows]
    _dots(ax, y, vals, intervals, infinite, labels, "tab:blue")
    for yy, v, inf in zip(y, vals, infinite):
        if not inf:
            ax.annotate(f"{v:.3f}", (v, yy), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    members = [r for r in rows if r.get("kind") == "member" and math.isfinite(r["bpb"])]
    if members:
        best = min(members, key=lambda r: r["bpb"])
        ax.axvline(best["bpb"], color="k", lw=0.8, ls="--", label=f"best member ({best['combiner']}): {best['bpb']:.3f}")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, [r["combiner"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("bits per byte (lower is better; axis zoomed, not from 0)")
    m = result.meta
    fig.suptitle(f"jaxens eval (cross-vocabulary): {', '.join(m.get('members', []))}; {m.get('bytes', '?')} bytes of "
                 f"{', '.join(m.get('texts', []))}", fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
