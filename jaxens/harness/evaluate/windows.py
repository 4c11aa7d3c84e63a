r"""Scored positions, their context windows and the cached member logits.

For one held-out token sequence :math:`x_0 \dots x_{T-1}`, ``positions`` targets :math:`j \in [1, T)`
are drawn without replacement by a generator seeded with ``(seed, split, text)``
(:func:`choose_targets`).  Target :math:`j` is predicted by the window of ``context`` tokens
starting at :math:`s(j)` (:func:`window_start`): :math:`s = 0` for :math:`j \le C`, else the first
start on the ``stride`` grid whose window reaches :math:`j`, so :math:`j` sees at least
:math:`C - \text{stride} + 1` tokens.  Each member runs one full forward per needed window
(:func:`jaxens.models.forward.full_logits`) and its logits at the targets are cached
(:class:`EvalData`, ``(n, P, v)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.harness.members import common_vocab
from jaxens.harness.reports import progress_bar
from jaxens.models.forward import full_logits


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

    bar = progress_bar(total=len(members) * nb, desc="member forwards", disable=not progress)
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
