r"""Scores of a combiner's rows :math:`\log p(\cdot \mid x_{<j})` against the observed tokens :math:`x_j`.

* ``nll``        :math:`-\frac1P\sum_j \log p(x_j)` (``inf`` if a row gives :math:`x_j` zero mass), ``ppl = exp(nll)``;
* ``inf_frac``   fraction of rows with :math:`p(x_j) = 0`, ``nll_finite`` the mean over the others;
* ``top1``       :math:`\frac1P\sum_j [\arg\max p = x_j]`;
* ``ece``        expected calibration error of the confidence :math:`\max_k p_k` with ``bins`` equal
  bins: :math:`\sum_b \frac{|b|}{P}\,|\mathrm{acc}(b) - \mathrm{conf}(b)|`;
* ``delta`` (= ``dnll``) paired difference to a reference row,
  :math:`\Delta = \frac1P\sum_j \log p_\mathrm{ref}(x_j) - \log p(x_j)` (negative: better than the
  reference), its standard error ``dnll_se`` and ``ci_low`` / ``ci_high``: the 95 % paired block
  bootstrap interval (:func:`paired_bootstrap`).

Smoothing: :math:`\log((1-\lambda) p^\star + \lambda q)` from the two log-probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int

from jaxens.harness.evaluate.config import ECE_BINS

METRICS = ("rows", "nll", "ppl", "inf_rows", "inf_frac", "nll_finite", "top1", "ece")


class RowScores(NamedTuple):
    """Per-row scores of one combiner."""

    logp_target: np.ndarray  # (P,) log p(observed), -inf if zero mass
    correct: np.ndarray  # (P,) bool, argmax == observed
    confidence: np.ndarray  # (P,) max_k p_k


@jax.jit
def _row_scores(logp, targets):
    lt = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return lt, jnp.argmax(logp, axis=-1) == targets, jnp.exp(jnp.max(logp, axis=-1))


def row_scores(logp: Float[ArrayLike, "P v"], targets: Int[ArrayLike, " P"]) -> RowScores:
    lt, c, conf = _row_scores(jnp.asarray(logp), jnp.asarray(targets, jnp.int32))
    return RowScores(np.asarray(lt, np.float64), np.asarray(c), np.asarray(conf, np.float64))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 confidence with ``bins`` equal-width bins on ``[0, 1]``."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    if confidence.size == 0:
        return float("nan")
    idx = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if np.any(sel):
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def summarize(s: RowScores) -> dict:
    lt = s.logp_target
    finite = np.isfinite(lt)
    nll = float(-np.mean(lt)) if finite.all() else float("inf")
    return {
        "rows": int(lt.size),
        "nll": nll,
        "ppl": float(np.exp(nll)) if np.isfinite(nll) else float("inf"),
        "inf_rows": int((~finite).sum()),
        "inf_frac": float((~finite).mean()),
        "nll_finite": float(-np.mean(lt[finite])) if finite.any() else float("nan"),
        "top1": float(np.mean(s.correct)),
        "ece": expected_calibration_error(s.confidence, s.correct),
        "_lt": lt,  # per-row log p(observed), for paired comparisons (dropped from the output)
    }


def smooth_target_logp(logp_star_t: np.ndarray, logq_t: np.ndarray, lam: float) -> np.ndarray:
    """``log((1-lam) p*_t + lam q_t)`` from the two log-probabilities (``-inf`` safe)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + logp_star_t, np.log(lam) + logq_t)


def smooth_logp(logp_star: np.ndarray, logq: np.ndarray, lam: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + logp_star, np.log(lam) + logq).astype(np.float32)


def paired_bootstrap(d: np.ndarray, blocks: np.ndarray, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    r"""Percentile interval of the mean of the paired differences ``d`` ``(P,)`` under a block
    bootstrap: the blocks (``blocks[j]``: row ``j``'s block id) are drawn with replacement, and
    the statistic is :math:`\sum_{b \in \text{draw}} S_b / \sum_{b \in \text{draw}} N_b` (``S_b``,
    ``N_b``: sum of ``d`` and rows of block ``b``).  Blocks keep dependent rows together (rows
    whose targets are close in the same text share most of their context); the same ``seed`` draws
    the same blocks for every combiner, so intervals of different rows are paired too."""
    d = np.asarray(d, np.float64)
    _, inv = np.unique(np.asarray(blocks), return_inverse=True)
    sums, counts = np.bincount(inv, weights=d), np.bincount(inv).astype(np.float64)
    K = sums.size
    idx = np.random.default_rng(seed).integers(0, K, size=(resamples, K))
    stat = sums[idx].sum(1) / counts[idx].sum(1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(stat, [a, 1.0 - a])
    return float(lo), float(hi)


def reference_row(rows: list[dict]) -> dict | None:
    """The tuned simple combiner: the learned logit / probability average with the lower validation
    NLL (the uniform logit average without learning)."""
    learned = [r for r in rows if r["kind"] == "learned" and "val_nll" in r and "_lt" in r]
    return min(learned, key=lambda r: r["val_nll"]) if learned else next(
        (r for r in rows if r["combiner"] == "logit_average"), None)


def paired_differences(rows: list[dict], blocks: np.ndarray | None = None, resamples: int = 2000,
                       seed: int = 0) -> str | None:
    """Add ``delta`` (also ``dnll``), ``dnll_se``, ``ci_low``, ``ci_high`` to every row: the mean
    over test rows of ``-log p(obs) - (-log p_ref(obs))``, its standard error and its 95 % paired
    bootstrap interval over ``blocks`` (:func:`paired_bootstrap`; ``None``: every row its own
    block), against :func:`reference_row`.  Drops the per-row data; returns the reference's name."""
    ref = reference_row(rows)
    for r in rows:
        lt = r.get("_lt")
        if ref is None or lt is None:
            continue
        with np.errstate(invalid="ignore"):
            d = -np.asarray(lt) + np.asarray(ref["_lt"])
        if np.all(np.isfinite(d)):
            r["delta"] = r["dnll"] = float(np.mean(d))
            r["dnll_se"] = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
            b = np.arange(d.size) if blocks is None else blocks
            r["ci_low"], r["ci_high"] = paired_bootstrap(d, b, resamples, seed)
        else:
            r["delta"] = r["dnll"] = r["ci_low"] = r["ci_high"] = float("inf")
            r["dnll_se"] = float("nan")
    for r in rows:
        r.pop("_lt", None)
    return None if ref is None else ref["combiner"]
