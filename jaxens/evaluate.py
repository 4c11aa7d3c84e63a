r"""Teacher-forced evaluation of ensembles on held-out text (the harness behind ``jaxens eval``).

Nothing is generated.  A held-out token sequence :math:`x_0 \dots x_{T-1}` is cut into windows of
``context`` tokens (every target :math:`x_j` is predicted from at least ``context - stride + 1``
preceding tokens, except near the start), ``positions`` targets per text are drawn with a seeded
generator, every member runs **one** full forward pass per window
(:func:`jaxens.models.forward.full_logits`) and the member logits at the drawn positions are
cached: ``(n, P, v)``.  Every combiner then maps the cached rows to
:math:`\log p(\cdot \mid x_{<j})` and scores the observed next token:

* ``nll``        :math:`-\frac1P\sum_j \log p(x_j)` over all rows (``inf`` if any row gives the
  observed token zero mass), ``ppl = exp(nll)``;
* ``inf_frac``   fraction of rows with :math:`p(x_j) = 0`, and ``nll_finite`` the mean over the others;
* ``top1``       :math:`\frac1P\sum_j [\arg\max p = x_j]`;
* ``ece``        expected calibration error of the top-1 confidence :math:`\max_k p_k`, 15 equal bins:
  :math:`\sum_b \frac{|b|}{P}\,|\mathrm{acc}(b) - \mathrm{conf}(b)|`;
* ``infeasible`` fraction of rows whose bottleneck solve returned ``Status.INFEASIBLE`` (the
  hard constraints admit no distribution; the row then holds the least-squares relaxation),
  ``iters`` the mean solver iterations;
* ``tok_s``      tokens per second at the measured costs, :math:`1 / (\sum_{i \in \text{used}} t_i + t_c)`
  with :math:`t_i` member :math:`i`'s forward time per token (window tokens, compile excluded)
  and :math:`t_c` the combiner's time per row (batched, compile excluded).  ME runs one member per
  step: its cost is :math:`\sum_i w_i t_i`.

Combiners evaluated: every single member; ``logit_average`` and ``prob_average`` with uniform
weights and with weights and temperature **learned on the validation split** by gradient descent
(:func:`jaxens.learn.fit`); ME, whose per-step distribution is *exactly* ``prob_average`` with its
weights and temperature (its row reports that exact distribution, not samples); and every
bottleneck objective of :data:`jaxens.objectives.OBJECTIVES` under three constraint sets: all
members hard (mostly infeasible on real members: reported), the strongest member (lowest
validation NLL) hard only, and all members soft with strength ``rho``.  Each bottleneck row also
appears smoothed, :math:`(1-\lambda)p^\star + \lambda\,\mathrm{softmax}(\sum_i w_i \log\hat p_i)`,
with :math:`\lambda` chosen on the validation split from a grid; the smoothing needs no new
solve (``p*`` does not depend on :math:`\lambda`), and equals the ``lam`` option of
:func:`jaxens.bottleneck`.  Optionally the ``kl`` objective with soft constraints is learned
end to end (weights, per-member ``rho``, ``lambda``) through the solver's implicit adjoint.

Everything is deterministic given ``seed`` except the ``tok_s`` column.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.base import Combiner
from jaxens.objectives import OBJECTIVES

SPLITS = ("train", "validation", "test")
DEFAULT_TEXTS = ("alice29.txt", "asyoulik.txt")
DEFAULT_MEMBERS = ("smollm2-135m", "smollm2-tiny-64", "smollm2-tiny-128", "smollm2-tiny-256")
CONSTRAINT_SETS = ("all", "best", "soft")
LAMBDA_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
ECE_BINS = 15


# ---------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Static settings of one evaluation.

    Attributes:
      context: window length ``C`` (tokens fed to the members per window).
      stride: window stride; each target sees at least ``C - stride + 1`` tokens of context.
      positions: targets scored per text on the evaluation split.
      val_positions: targets per text on the validation split (tuning of weights, ``lambda``).
      batch_rows: rows per combiner call (the last batch is padded: one compile per combiner).
      batch_windows: windows per member forward.
      seed: seeds the choice of positions (and nothing else is random).
      objectives: bottleneck objectives to evaluate (``()`` for none).
      constraints: constraint sets among ``"all"`` (all hard), ``"best"`` (strongest member hard),
        ``"soft"`` (all soft with strength ``rho``).
      rho: soft-constraint strength for the ``"soft"`` set.
      lambda_grid: smoothing weights tried on the validation split.
      learn: learn the averaging weights and temperature on the validation split.
      learn_steps: optimiser steps of each learned combiner.
      learn_bottleneck: also learn ``kl`` with soft constraints (weights, ``rho``, ``lambda``)
        through the solver (slow at large vocabularies).
      vocab_size: common vocabulary (first ``vocab_size`` logits); default the members' shared one.
      hessian_topk: the ``kl`` / ``max_entropy`` solver (:class:`jaxens.EntropicNewton`) forms its
        Hessian from this many tokens of largest mass (``None``: all; ``O(K k^2)`` per step instead
        of ``O(v k^2)``, the cost that dominates at ``v = 49,152``).
      max_iters: iteration cap of the ADMM solvers (``sum_ce``, ``sum_sq_ce``,
        ``min_underestimation``) and of the least-squares phase (``None``: the solvers' own caps,
        10,000 / 2,000).  Rows that reach it are counted in the table's ``not conv.`` column (their
        ``p`` is the last iterate, renormalised).
      progress: tqdm progress bars on stderr.
    """

    context: int = 128
    stride: int = 64
    positions: int = 64
    val_positions: int = 16
    batch_rows: int = 16
    batch_windows: int = 4
    seed: int = 0
    objectives: tuple[str, ...] = OBJECTIVES
    constraints: tuple[str, ...] = CONSTRAINT_SETS
    rho: float = 1.0
    lambda_grid: tuple[float, ...] = LAMBDA_GRID
    learn: bool = True
    learn_steps: int = 100
    learn_bottleneck: bool = False
    vocab_size: int | None = None
    hessian_topk: int | None = 2048
    max_iters: int | None = 3000
    progress: bool = True

    def __post_init__(self):
        for name in ("context", "stride", "positions", "val_positions", "batch_rows", "batch_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.stride > self.context:
            raise ValueError(f"stride ({self.stride}) must be <= context ({self.context})")
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "constraints", tuple(self.constraints))
        object.__setattr__(self, "lambda_grid", tuple(float(x) for x in self.lambda_grid))
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise ValueError(f"unknown bottleneck objective {o!r}; choose from {', '.join(OBJECTIVES)}")
        for c in self.constraints:
            if c not in CONSTRAINT_SETS:
                raise ValueError(f"unknown constraint set {c!r}; choose from {', '.join(CONSTRAINT_SETS)}")
        if any(not 0.0 < x < 1.0 for x in self.lambda_grid):
            raise ValueError(f"lambda_grid values must be in (0, 1), got {self.lambda_grid}")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if self.max_iters is not None and (isinstance(self.max_iters, bool) or self.max_iters < 1):
            raise ValueError(f"max_iters must be a positive int or None, got {self.max_iters!r}")


# ---------------------------------------------------------------- texts


def data_dir() -> Path:
    """The folder of the default texts (:func:`jaxens.data.data_root`: ``$JAXENS_DATA`` or ``../shared/data``)."""
    from jaxens.data import data_root

    return data_root()


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; empty, missing or non-UTF-8 files raise ``ValueError``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"text file {str(p)!r} does not exist (or is not a file)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {str(p)!r} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if not text.strip():
        raise ValueError(f"text file {str(p)!r} is empty")
    return text


def split_text(text: str, split: str) -> str:
    """The ``split`` part of one text (:func:`jaxens.data.split_text`: first ~80% train, ~10%
    validation, last ~10% test, cut at line boundaries), the split the members were trained on."""
    from jaxens.data import split_text as _split

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _split(text)[split]


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` without special tokens (as :mod:`jaxens.data` tokenises)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return np.asarray(list(ids), np.int64)


# ---------------------------------------------------------------- positions and member logits


def choose_targets(num_tokens: int, positions: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted target indices ``j`` in ``[1, num_tokens)`` (all of them if there are few)."""
    all_targets = np.arange(1, num_tokens)
    if positions >= all_targets.size:
        return all_targets
    return np.sort(rng.choice(all_targets, size=positions, replace=False))


def window_start(j: np.ndarray, num_tokens: int, context: int, stride: int) -> np.ndarray:
    """Start of the window that predicts target ``j``: tokens ``[s, s + C)`` predict ``s+1 .. s+C``.

    ``s = 0`` for ``j <= C``; otherwise the first stride-grid start whose window reaches ``j``,
    so ``j`` sees ``j - s >= C - stride + 1`` tokens (the last window is aligned to the end).
    """
    j = np.asarray(j)
    s = np.where(j <= context, 0, -(-(j - context) // stride) * stride)
    return np.minimum(s, num_tokens - 1 - context)


class EvalData(NamedTuple):
    """Cached member logits at the scored positions.

    ``logits[i, r]`` is member ``i``'s next-token logits for row ``r``, whose observed next token
    is ``targets[r]``; ``text[r]`` / ``position[r]`` locate the row.  ``member_seconds`` holds each
    member's forward time per window token (compile excluded).
    """

    logits: np.ndarray  # (n, P, v) float32
    targets: np.ndarray  # (P,) int32
    text: np.ndarray  # (P,) int32
    position: np.ndarray  # (P,) int32
    member_seconds: np.ndarray  # (n,) float64


def collect_logits(
    members: Sequence[Any],
    token_lists: Sequence[np.ndarray],
    *,
    context: int,
    stride: int,
    positions: int,
    seed: int,
    split_code: int = 0,
    vocab_size: int | None = None,
    batch_windows: int = 4,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> EvalData:
    """Run every member once per needed window and cache its logits at ``positions`` targets per text."""
    from jaxens.models.forward import full_logits

    members = list(members)
    if not members:
        raise ValueError("evaluation needs at least one member")
    v = common_vocab(members, vocab_size)
    names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
    windows: list[tuple[int, int]] = []  # (text, start)
    rows: list[tuple[int, int, int]] = []  # (text, target j, window index)
    tok_arrays = []
    for t, ids in enumerate(token_lists):
        ids = np.asarray(ids, np.int64)
        if ids.size < context + 1:
            raise ValueError(
                f"text {t} has {ids.size} tokens, fewer than context + 1 = {context + 1}; "
                "lower --context or use a longer text"
            )
        if ids.max(initial=0) >= v:
            raise ValueError(f"text {t} has token id {int(ids.max())} >= vocabulary size {v}")
        tok_arrays.append(ids)
        rng = np.random.default_rng([seed, split_code, t])
        js = choose_targets(ids.size, positions, rng)
        starts = window_start(js, ids.size, context, stride)
        index = {}
        for j, s in zip(js.tolist(), starts.tolist()):
            if s not in index:
                index[s] = len(windows)
                windows.append((t, s))
            rows.append((t, j, index[s]))
    W = len(windows)
    nb = -(-W // batch_windows)
    toks = np.zeros((nb * batch_windows, context), np.int32)
    for w, (t, s) in enumerate(windows):
        toks[w] = tok_arrays[t][s : s + context]
    toks[W:] = toks[W - 1] if W else 0
    # row r reads window w at offset j - s - 1
    row_w = np.asarray([w for _, _, w in rows], np.int64)
    row_off = np.asarray([j - windows[w][1] - 1 for _, j, w in rows], np.int64)
    P = len(rows)
    out = np.zeros((len(members), P, v), np.float32)
    seconds = np.zeros(len(members))

    bar = _tqdm(total=len(members) * nb, desc="member forwards", disable=not progress)
    for i, m in enumerate(members):
        # compile on the first batch (not timed), then time the forward of every batch
        jax.block_until_ready(full_logits(m, jnp.asarray(toks[:batch_windows])))
        spent = 0.0
        for b in range(nb):
            t0 = time.perf_counter()
            lg = jax.block_until_ready(full_logits(m, jnp.asarray(toks[b * batch_windows : (b + 1) * batch_windows])))
            spent += time.perf_counter() - t0
            idx = np.nonzero((row_w >= b * batch_windows) & (row_w < (b + 1) * batch_windows))[0]
            if idx.size:
                lg = np.asarray(lg)
                out[i, idx] = lg[row_w[idx] - b * batch_windows, row_off[idx], :v]
            bar.update(1)
        seconds[i] = spent / max(1, nb * batch_windows * context)
    bar.close()
    return EvalData(
        out,
        np.asarray([tok_arrays[t][j] for t, j, _ in rows], np.int32),
        np.asarray([t for t, _, _ in rows], np.int32),
        np.asarray([j for _, j, _ in rows], np.int32),
        seconds,
    )


def common_vocab(members: Sequence[Any], vocab_size: int | None = None) -> int:
    vocabs = []
    for i, m in enumerate(members):
        v = getattr(getattr(m, "config", None), "vocab_size", None)
        if not isinstance(v, int):
            raise ValueError(f"member {i} ({type(m).__name__}) has no config.vocab_size")
        vocabs.append(v)
    if vocab_size is None:
        if len(set(vocabs)) != 1:
            raise ValueError(
                f"members have different vocabulary sizes {vocabs}; same-vocabulary evaluation needs one. "
                f"If they share a tokenizer and only pad their tables, pass vocab_size={min(vocabs)}"
            )
        return vocabs[0]
    if not 0 < vocab_size <= min(vocabs):
        raise ValueError(f"vocab_size must be in [1, {min(vocabs)}], got {vocab_size}")
    return int(vocab_size)


# ---------------------------------------------------------------- metrics


class RowScores(NamedTuple):
    """Per-row scores of one combiner."""

    logp_target: np.ndarray  # (P,) log p(observed), -inf if zero mass
    correct: np.ndarray  # (P,) bool, argmax == observed
    confidence: np.ndarray  # (P,) max_k p_k


@jax.jit
def _row_scores(logp, targets):
    lt = jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return lt, jnp.argmax(logp, axis=-1) == targets, jnp.exp(jnp.max(logp, axis=-1))


def row_scores(logp: Float[Array, "P v"], targets: Int[Array, " P"]) -> RowScores:
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


# ---------------------------------------------------------------- running a combiner over cached rows


class CombinerRun(NamedTuple):
    logp: np.ndarray  # (P, v) float32
    status: np.ndarray | None  # (P,) solver status (bottleneck combiners)
    iterations: np.ndarray | None  # (P,)
    seconds_per_row: float  # combine time per row, compile excluded
    compile_seconds: float


def jit_combiner(combiner: Combiner) -> Callable:
    """``jit(combine)`` returning ``(log_probs, info)``; reuse it across calls of :func:`run_combiner`."""
    return jax.jit(lambda xs, st: combiner.combine(list(xs), st)[::2])


def run_combiner(combiner: Combiner, logits: np.ndarray, batch_rows: int = 16, progress: bool = False,
                 desc: str = "", fn: Callable | None = None) -> CombinerRun:
    """``combiner.combine`` over the cached rows ``logits`` ``(n, P, v)`` in padded batches of
    ``batch_rows`` (cold starts: rows are independent positions).  ``fn``: from :func:`jit_combiner`."""
    n, P, v = logits.shape
    B = batch_rows
    nb = -(-P // B)
    pad = nb * B - P
    x = np.concatenate([logits, np.repeat(logits[:, -1:], pad, axis=1)], axis=1) if pad else logits
    fn = fn or jit_combiner(combiner)

    def call(b):
        xs = tuple(jnp.asarray(x[i, b * B : (b + 1) * B]) for i in range(n))
        return jax.block_until_ready(fn(xs, combiner.init(B)))

    t0 = time.perf_counter()
    first = call(0)
    compile_s = time.perf_counter() - t0
    outs = [first]
    bar = _tqdm(total=nb, desc=desc or "combine", disable=not progress, leave=False)
    bar.update(1)
    t0 = time.perf_counter()
    for b in range(1, nb):
        outs.append(call(b))
        bar.update(1)
    if nb == 1:  # time a second call of the only batch
        call(0)
    bar.close()
    per_row = (time.perf_counter() - t0) / (max(nb - 1, 1) * B)
    logp = np.concatenate([np.asarray(o[0], np.float32) for o in outs])[:P]
    info = [o[1] for o in outs]
    status = iters = None
    if hasattr(info[0], "status"):
        status = np.concatenate([np.asarray(i.status) for i in info])[:P]
        iters = np.concatenate([np.asarray(i.iterations) for i in info])[:P]
    return CombinerRun(logp, status, iters, per_row, max(compile_s - per_row * B, 0.0))


def smooth_target_logp(logp_star_t: np.ndarray, logq_t: np.ndarray, lam: float) -> np.ndarray:
    """``log((1-lam) p*_t + lam q_t)`` from the two log-probabilities (``-inf`` safe)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + logp_star_t, np.log(lam) + logq_t)


def smooth_logp(logp_star: np.ndarray, logq: np.ndarray, lam: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-lam) + logp_star, np.log(lam) + logq).astype(np.float32)


# ---------------------------------------------------------------- the evaluation


@dataclasses.dataclass
class EvalResult:
    """Rows of the table (dicts), the configuration and the measurement context."""

    rows: list[dict]
    config: dict
    meta: dict

    def to_json(self) -> dict:
        return {"config": self.config, "meta": self.meta, "rows": self.rows}

    def markdown(self) -> str:
        return markdown_table(self.rows)


def _unembeddings(members, v):
    Ws, bs = [], []
    for i, m in enumerate(members):
        W, b = m.unembedding()
        if W.shape[0] < v:
            raise ValueError(f"member {i} unembedding {W.shape} has fewer than vocab_size={v} rows")
        Ws.append(np.asarray(W, np.float64)[:v])
        bs.append(None if b is None else np.asarray(b, np.float64)[:v])
    return Ws, bs


def _row(name, kind, summary, *, tok_s, infeasible=None, iters=None, lam=None, note="", params=None,
         not_converged=None):
    r = {"combiner": name, "kind": kind, **summary, "infeasible": infeasible, "iters": iters,
         "not_converged": not_converged, "lam": lam, "tok_s": tok_s, "note": note}
    if params is not None:
        r["params"] = params
    return r


def evaluate(
    members: Sequence[Any],
    val_tokens: Sequence[np.ndarray],
    test_tokens: Sequence[np.ndarray],
    config: EvalConfig = EvalConfig(),
    names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate every combiner on ``test_tokens`` (one token array per text), tuning on ``val_tokens``.

    Returns an :class:`EvalResult` whose rows carry the metrics of the module docstring.
    """
    from jaxens import learn

    log = log or (lambda s: None)
    members = list(members)
    n = len(members)
    names = list(names) if names is not None else [f"member{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} members")
    cfg = config
    v = common_vocab(members, cfg.vocab_size)
    common = dict(context=cfg.context, stride=cfg.stride, seed=cfg.seed, vocab_size=v,
                  batch_windows=cfg.batch_windows, progress=cfg.progress, names=names)
    t0 = time.perf_counter()
    val = collect_logits(members, val_tokens, positions=cfg.val_positions, split_code=1, **common)
    test = collect_logits(members, test_tokens, positions=cfg.positions, split_code=2, **common)
    member_s = test.member_seconds
    # one batch size for both splits (one compile per combiner) that pads neither much
    cfg = dataclasses.replace(cfg, batch_rows=max(1, min(cfg.batch_rows, val.logits.shape[1], test.logits.shape[1])))
    log(f"member logits cached: validation {val.logits.shape[1]} rows, test {test.logits.shape[1]} rows "
        f"({time.perf_counter() - t0:.1f}s)")
    rows: list[dict] = []

    def tok_s(used_cost, per_row):
        return float(1.0 / (used_cost + per_row))

    def score(logp, data):
        return summarize(row_scores(logp, data.targets))

    # single members
    val_nll = []
    for i in range(n):
        lp_val = jax.nn.log_softmax(jnp.asarray(val.logits[i]), axis=-1)
        val_nll.append(summarize(row_scores(lp_val, val.targets))["nll"])
        lp = np.asarray(jax.nn.log_softmax(jnp.asarray(test.logits[i]), axis=-1))
        rows.append(_row(f"member {names[i]}", "member", score(lp, test), tok_s=tok_s(member_s[i], 0.0)))
    best = int(np.argmin(val_nll))
    all_cost = float(np.sum(member_s))

    # averaging, uniform
    uniform = {}
    for label, comb in (("logit_average", logit_average()), ("prob_average", prob_average())):
        run = run_combiner(comb, test.logits, cfg.batch_rows)
        uniform[label] = run
        rows.append(_row(label, "average", score(run.logp, test), tok_s=tok_s(all_cost, run.seconds_per_row),
                         note="uniform weights"))
    rows.append(_row("me", "me", {k: v_ for k, v_ in rows[-1].items() if k in _METRICS + ("_lt",)},
                     tok_s=tok_s(float(np.mean(member_s)), 0.0),
                     note="exact per-step distribution = prob_average (uniform); one member per step"))

    # averaging, learned on validation
    learned_w = None
    if cfg.learn:
        for label, factory in (("logit_average", learn.logit_average_factory),
                               ("prob_average", learn.prob_average_factory)):
            params0 = learn.averaging_params(n)
            params, hist = learn.fit(list(val.logits), val.targets, factory, params0, steps=cfg.learn_steps)
            comb = factory(params)
            run = run_combiner(comb, test.logits, cfg.batch_rows)
            readable = learn.readable(params)
            rows.append(_row(f"{label} (learned)", "learned", score(run.logp, test),
                             tok_s=tok_s(all_cost, run.seconds_per_row), params=readable,
                             note=f"w,T fit on validation ({cfg.learn_steps} Adam steps, "
                                  f"val NLL {hist['loss'][0]:.3f}->{hist['loss'][-1]:.3f})"))
            rows[-1]["val_nll"] = float(hist["loss"][-1])
            if label == "prob_average":
                learned_w = np.asarray(readable["weights"])
                rows.append(_row("me (learned)", "me", {k: v_ for k, v_ in rows[-1].items() if k in _METRICS + ("_lt",)},
                                 tok_s=tok_s(float(np.dot(learned_w, member_s)), 0.0), params=readable,
                                 note="exact = prob_average (learned w, T); one member per step"))

    # bottleneck objectives x constraint sets, each plus smoothing with lambda tuned on validation
    if cfg.objectives:
        rows.extend(_bottleneck_rows(members, v, val, test, cfg, best, names, all_cost, log))
    if cfg.learn_bottleneck:
        rows.append(_learned_bottleneck_row(members, v, val, test, cfg, all_cost, log))

    reference = _paired_differences(rows)
    meta = {
        "reference": reference,
        "members": names,
        "vocab_size": v,
        "best_member": names[best],
        "val_rows": int(val.logits.shape[1]),
        "test_rows": int(test.logits.shape[1]),
        "member_seconds_per_token": [float(s) for s in member_s],
        "validation_nll": {names[i]: float(val_nll[i]) for i in range(n)},
        "jax_backend": jax.default_backend(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return EvalResult(rows, dataclasses.asdict(cfg), meta)


def _paired_differences(rows: list[dict]) -> str | None:
    """Add ``dnll``/``dnll_se`` to every row: the mean over test rows of
    ``-log p(obs) - (-log p_ref(obs))`` and its standard error (paired: same positions), against
    the tuned simple combiner ``ref`` (the learned logit / probability average with the lower
    validation NLL; the uniform logit average without learning).  Drops the per-row data."""
    learned = [r for r in rows if r["kind"] == "learned" and "val_nll" in r]
    ref = min(learned, key=lambda r: r["val_nll"]) if learned else next(
        (r for r in rows if r["combiner"] == "logit_average"), None)
    for r in rows:
        lt = r.get("_lt")
        if ref is None or lt is None:
            continue
        with np.errstate(invalid="ignore"):
            d = -np.asarray(lt) + np.asarray(ref["_lt"])
        if np.all(np.isfinite(d)):
            r["dnll"] = float(np.mean(d))
            r["dnll_se"] = float(np.std(d, ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        else:
            r["dnll"], r["dnll_se"] = float("inf"), float("nan")
    for r in rows:
        r.pop("_lt", None)
    return None if ref is None else ref["combiner"]


_METRICS = ("rows", "nll", "ppl", "inf_rows", "inf_frac", "nll_finite", "top1", "ece")


def _solver(objective: str, cfg: EvalConfig):
    """The objective's default solver, with the truncated Newton Hessian for the entropic ones."""
    from jaxens.solvers.entropic_newton import EntropicNewton

    if objective in ("kl", "max_entropy") and cfg.hessian_topk is not None:
        return EntropicNewton(hessian_topk=cfg.hessian_topk)
    if objective in ("sum_ce", "sum_sq_ce", "min_underestimation") and cfg.max_iters is not None:
        from jaxens.solvers.admm import ADMM

        return ADMM(max_iters=cfg.max_iters)
    return None


def _ls_solver(cfg: EvalConfig):
    from jaxens.solvers.fista import FISTA

    return None if cfg.max_iters is None else FISTA(max_iters=cfg.max_iters)


def feasibility_rows(problem, logits: np.ndarray, batch_rows: int, solver=None) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares phase of the hard constraints for every cached row (``(n, P, v)`` logits).

    Returns ``(status (P,), p_ls (P, v))``: what :func:`jaxens.combiners.bottleneck.solve_row`
    returns for an ``INFEASIBLE`` row whatever the objective, computed once per row instead of
    once per objective (and without first running the objective's solver to its cap on a row
    that has no feasible point).
    """
    from jaxens import objectives as obj
    from jaxens.solvers.least_squares import least_squares

    n, P, v = logits.shape
    w = jnp.ones((n,), problem.A.dtype) / n

    @jax.jit
    def run(x):
        def one(xr):
            d = obj.row_data("kl", xr, w)
            m = problem.moments(jnp.exp(d.logp))
            return least_squares(problem, m, d.mask, solver)
        sol = jax.vmap(one)(x)
        return sol.status, sol.p

    status, ps = [], []
    for b in range(0, P, batch_rows):
        x = jnp.asarray(np.moveaxis(logits[:, b : b + batch_rows], 0, 1), problem.A.dtype)
        st, p = run(x)
        status.append(np.asarray(st))
        ps.append(np.asarray(p, np.float32))
    return np.concatenate(status), np.concatenate(ps)


def _bottleneck_rows(members, v, val, test, cfg, best, names, all_cost, log):
    from jaxens.combiners.bottleneck import bottleneck
    from jaxens.problem import make_problem

    n = len(members)
    Ws, bs = _unembeddings(members, v)
    sets = {
        "all": dict(hard="all", soft=None, rho=None, label="hard=all"),
        "best": dict(hard=(best,), soft=None, rho=None, label=f"hard={names[best]}"),
        "soft": dict(hard=(), soft=tuple(range(n)), rho=cfg.rho, label=f"soft rho={cfg.rho:g}"),
    }
    # the smoothing target: the uniform logit average (bottleneck's lam uses the same weights)
    lq_val = row_scores(np.asarray(jax.nn.log_softmax(
        jnp.mean(jax.nn.log_softmax(jnp.asarray(val.logits), -1), 0), -1)), val.targets).logp_target
    lq_test_full = np.asarray(jax.nn.log_softmax(
        jnp.mean(jax.nn.log_softmax(jnp.asarray(test.logits), -1), 0), -1))
    rows = []
    jobs = [(c, o) for c in cfg.constraints for o in cfg.objectives]
    bar = _tqdm(total=len(jobs), desc="bottleneck combiners", disable=not cfg.progress)
    for cset in cfg.constraints:
        s = sets[cset]
        problem = make_problem(Ws, bs, hard=s["hard"], soft=s["soft"], dtype=jnp.float32)
        feas = None
        if s["hard"] == "all" and n > 1:
            # one hard member is always feasible (its own p_i); several may not be: decide once
            t_start = time.perf_counter()
            feas = {split: feasibility_rows(problem, data.logits, cfg.batch_rows, _ls_solver(cfg))
                    for split, data in (("val", val), ("test", test))}
            ls_s = (time.perf_counter() - t_start) / (val.logits.shape[1] + test.logits.shape[1])
            log(f"hard=all least-squares phase: {time.perf_counter() - t_start:.1f}s, infeasible "
                f"{np.mean(feas['test'][0] == 2):.2f} of test rows")
        for objective in cfg.objectives:
            name = f"bn:{objective} [{s['label']}]"
            bar.set_postfix_str(name)
            try:
                # The combiner's own least-squares phase is never needed here: with several hard
                # members the verdict was decided above; one hard member is always feasible (its
                # own distribution is a witness), so the phase could only confirm it (and would
                # run to its cap on every row where the objective's solver did).
                comb = bottleneck(problem, objective, rho=s["rho"], solver=_solver(objective, cfg),
                                  check_feasibility=False)
                fn = jit_combiner(comb)
                t_start = time.perf_counter()
                if feas is None:
                    rv = run_combiner(comb, val.logits, cfg.batch_rows, fn=fn)
                    rt = run_combiner(comb, test.logits, cfg.batch_rows, fn=fn)
                else:
                    rv = _run_feasible_rows(comb, val.logits, cfg.batch_rows, fn, *feas["val"], ls_s)
                    rt = _run_feasible_rows(comb, test.logits, cfg.batch_rows, fn, *feas["test"], ls_s)
                log(f"{name}: {time.perf_counter() - t_start:.1f}s (compile {rv.compile_seconds:.1f}s, "
                    f"{rt.seconds_per_row:.3f}s/row, infeasible {np.mean(rt.status == 2):.2f})")
            except (ValueError, TypeError, NotImplementedError) as e:  # objective/solver does not support the set
                rows.append(_row(name, "bottleneck", {}, tok_s=None, note=f"skipped: {e}"))
                log(f"{name}: skipped ({e})")
                bar.update(1)
                continue
            summary = summarize(row_scores(rt.logp, test.targets))
            stats = dict(infeasible=float(np.mean(rt.status == 2)), iters=float(np.mean(rt.iterations)),
                         not_converged=float(np.mean(rt.status == 1)))
            speed = 1.0 / (all_cost + rt.seconds_per_row)
            rows.append(_row(name, "bottleneck", summary, tok_s=speed, **stats))
            rows[-1]["compile_s"] = rv.compile_seconds
            # lambda on validation (NLL of the observed token only: no new solve)
            lt_val = row_scores(rv.logp, val.targets).logp_target
            nlls = [float(-np.mean(smooth_target_logp(lt_val, lq_val, lam))) for lam in cfg.lambda_grid]
            k = int(np.argmin(nlls))
            lam = cfg.lambda_grid[k]
            sm = smooth_logp(rt.logp, lq_test_full, lam)
            rows.append(_row(f"{name} +smooth", "bottleneck+smooth", summarize(row_scores(sm, test.targets)),
                             tok_s=speed, lam=lam, **stats, note=f"lambda from validation (val NLL {nlls[k]:.3f})"))
            bar.update(1)
    bar.close()
    return rows


def _run_feasible_rows(comb, logits, batch_rows, fn, status, p_ls, ls_seconds_per_row) -> CombinerRun:
    """:func:`run_combiner` on the rows the least-squares phase did not prove infeasible; the
    infeasible rows get the least-squares distribution with status ``INFEASIBLE`` (what the
    combiner itself returns for them).  ``comb`` runs without its own least-squares phase
    (``check_feasibility=False``): the verdict is ``status``."""
    P = logits.shape[1]
    infeasible = status == 2
    with np.errstate(divide="ignore"):
        logp = np.log(np.maximum(p_ls, 0.0)).astype(np.float32)
    out_status = np.full((P,), 2, np.int32)
    iters = np.zeros((P,), np.float64)
    keep = np.nonzero(~infeasible)[0]
    per_row, compile_s = 0.0, 0.0
    if keep.size:
        run = run_combiner(comb, logits[:, keep], min(batch_rows, keep.size), fn=fn)
        logp[keep] = run.logp
        out_status[keep] = run.status
        iters[keep] = run.iterations
        per_row, compile_s = run.seconds_per_row * keep.size / P, run.compile_seconds
    return CombinerRun(logp, out_status, iters, per_row + ls_seconds_per_row, compile_s)


def _learned_bottleneck_row(members, v, val, test, cfg, all_cost, log):
    from jaxens import learn
    from jaxens.problem import make_problem

    n = len(members)
    Ws, bs = _unembeddings(members, v)
    problem = make_problem(Ws, bs, hard=(), soft=tuple(range(n)), dtype=jnp.float32)
    params0 = learn.bottleneck_params(n, rho=cfg.rho, lam=0.1)
    t0 = time.perf_counter()
    solver = _solver("kl", cfg)
    factory = lambda params, problem: learn.bottleneck_kl_factory(params, problem, solver)  # noqa: E731
    params, hist = learn.fit(list(val.logits), val.targets, factory, params0,
                             steps=cfg.learn_steps, context=problem, batch_rows=cfg.batch_rows)
    log(f"learned bottleneck kl: {time.perf_counter() - t0:.1f}s")
    comb = factory(params, problem)
    rt = run_combiner(comb, test.logits, cfg.batch_rows)
    readable = learn.readable(params)
    return _row("bn:kl [soft, learned]", "learned", summarize(row_scores(rt.logp, test.targets)),
                tok_s=1.0 / (all_cost + rt.seconds_per_row), infeasible=float(np.mean(rt.status == 2)),
                iters=float(np.mean(rt.iterations)), lam=readable.get("lam"), params=readable,
                note=f"w, rho_i, lambda fit on validation through the solver (val NLL "
                     f"{hist['loss'][0]:.3f}->{hist['loss'][-1]:.3f})")


# ---------------------------------------------------------------- output


def _fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _dnll(r: dict) -> str:
    d, se = r.get("dnll"), r.get("dnll_se")
    if d is None:
        return "-"
    if isinstance(d, float) and math.isinf(d):
        return "inf"
    return f"{d:+.4f} ± {se:.4f}" if se is not None and se == se else f"{d:+.4f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """The evaluation table in Markdown (one line per combiner)."""
    head = ("combiner", "NLL", "ΔNLL vs tuned ± s.e.", "PPL", "inf rows", "NLL finite", "top-1", "ECE", "infeasible",
            "not conv.", "iters", "lambda", "tok/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        if "nll" not in r:
            lines.append(f"| {r['combiner']} | " + " | ".join(["-"] * (len(head) - 1)) + " |")
            continue
        cells = [
            r["combiner"],
            _fmt(r["nll"], ".4f"),
            _dnll(r),
            _fmt(r["ppl"], ".2f"),
            f"{r['inf_rows']}/{r['rows']}",
            _fmt(r["nll_finite"], ".4f"),
            _fmt(r["top1"], ".3f"),
            _fmt(r["ece"], ".3f"),
            _fmt(r.get("infeasible"), ".2f"),
            _fmt(r.get("not_converged"), ".2f"),
            _fmt(r.get("iters"), ".1f"),
            _fmt(r.get("lam"), ".3g"),
            _fmt(r.get("tok_s"), ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(_json_safe(result.to_json()), indent=2) + "\n")


def plot(result: EvalResult, path: str | os.PathLike) -> bool:
    """Bar chart of test NLL (finite rows; hatched where some rows were infinite) and top-1 accuracy.

    Returns False (with a warning) when matplotlib is not installed (``pip install jaxens[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'jaxens[plot]'); skipping the plot", stacklevel=2)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _tqdm(**kw):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, **kw)


# ---------------------------------------------------------------- CLI


def add_eval_parser(sub) -> None:
    """Register ``jaxens eval`` on the CLI's subparsers."""
    e = sub.add_parser("eval", help="teacher-forced evaluation of combiners on held-out text")
    e.add_argument("--member", action="append", help=f"zoo name, HF directory or .gguf (repeat); default: "
                   f"{' '.join(DEFAULT_MEMBERS)}")
    e.add_argument("--text", action="append", help="UTF-8 text file (repeat); its --split part is evaluated; "
                   f"default: {' '.join(DEFAULT_TEXTS)} from $JAXENS_DATA")
    e.add_argument("--split", default="test", choices=SPLITS, help="split evaluated (tuning uses validation)")
    e.add_argument("--positions", type=int, default=64, help="scored positions per text")
    e.add_argument("--val-positions", type=int, default=16, help="validation positions per text (tuning)")
    e.add_argument("--context", type=int, default=128)
    e.add_argument("--stride", type=int, default=64)
    e.add_argument("--batch-rows", type=int, default=16)
    e.add_argument("--objectives", nargs="*", default=list(OBJECTIVES),
                   help="bottleneck objectives (none: skip the bottleneck rows)")
    e.add_argument("--constraints", nargs="*", default=list(CONSTRAINT_SETS), choices=CONSTRAINT_SETS)
    e.add_argument("--rho", type=float, default=1.0, help="soft-constraint strength of the 'soft' set")
    e.add_argument("--learn-steps", type=int, default=100)
    e.add_argument("--no-learn", action="store_true", help="skip the learned-weights rows")
    e.add_argument("--learn-bottleneck", action="store_true", help="also learn kl with soft constraints (slow)")
    e.add_argument("--vocab-size", type=int)
    e.add_argument("--hessian-topk", type=int, default=2048,
                   help="kl/max_entropy Newton Hessian over the top-K tokens by mass (0: all)")
    e.add_argument("--max-iters", type=int, default=3000,
                   help="iteration cap of the ADMM objectives and the least-squares phase (0: the solvers' own)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    e.add_argument("--json", help="write the results as JSON")
    e.add_argument("--plot", help="write a PNG plot (needs matplotlib)")
    e.add_argument("--no-progress", action="store_true")
    from jaxens.vocab.eval_cross import add_cross_eval_args  # members with different vocabularies

    add_cross_eval_args(e)
    e.set_defaults(func=cmd_eval)


def load_split_tokens(paths: Sequence[str], tokenizer, split: str) -> list[np.ndarray]:
    out = []
    for p in paths:
        part = split_text(read_text(p), split)
        ids = encode(tokenizer, part)
        if ids.size == 0:
            raise ValueError(f"the {split} split of {p!r} is empty")
        out.append(ids)
    return out


def cmd_eval(args, out=None, err=None) -> int:
    from jaxens.cli import load_member

    out = out or sys.stdout
    err = err or sys.stderr
    cfg = EvalConfig(
        context=args.context, stride=args.stride, positions=args.positions, val_positions=args.val_positions,
        batch_rows=args.batch_rows, seed=args.seed, objectives=tuple(args.objectives or ()),
        constraints=tuple(args.constraints or ()), rho=args.rho, learn=not args.no_learn,
        learn_steps=args.learn_steps, learn_bottleneck=args.learn_bottleneck, vocab_size=args.vocab_size,
        hessian_topk=args.hessian_topk or None, max_iters=args.max_iters or None,
        progress=not args.no_progress,
    )
    specs = list(args.member or DEFAULT_MEMBERS)
    texts = list(args.text or [str(data_dir() / t) for t in DEFAULT_TEXTS])
    for t in texts:  # bad texts fail before any checkpoint loads
        read_text(t)
    if args.split == "validation":
        warnings.warn("evaluating on the validation split, which is also used for tuning", stacklevel=1)
    loaded = []
    for s in specs:
        try:
            loaded.append(load_member(s, args.dtype))
        except ValueError as e:
            raise ValueError(f"member {s!r}: {e}") from None
    from jaxens.vocab.eval_cross import cross_eval_cli, wants_cross_eval  # bits per byte (jaxens/vocab)

    if wants_cross_eval(args, loaded):
        return cross_eval_cli(args, loaded, specs, texts, out, err)
    members = [m for m, _ in loaded]
    tok = loaded[0][1]
    val_tokens = load_split_tokens(texts, tok, "validation")
    test_tokens = load_split_tokens(texts, tok, args.split)
    names = [Path(s).name if Path(s).exists() else s for s in specs]
    t0 = time.perf_counter()
    result = evaluate(members, val_tokens, test_tokens, cfg, names, log=lambda s: err.write(f"[jaxens eval] {s}\n"))
    result.meta["texts"] = [Path(t).name for t in texts]
    result.meta["split"] = args.split
    result.meta["wall_seconds"] = time.perf_counter() - t0
    out.write(result.markdown() + "\n")
    out.write(f"\n{result.meta['test_rows']} {args.split} positions ({', '.join(result.meta['texts'])}); "
              f"best member on validation: {result.meta['best_member']}; "
              f"{result.meta['wall_seconds']:.1f}s\n")
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0
