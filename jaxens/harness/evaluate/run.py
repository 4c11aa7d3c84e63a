"""The evaluation: cache the member logits of both splits, then score every combiner's rows.

:func:`evaluate` returns an :class:`jaxens.harness.reports.EvalResult` whose rows are, in order:
each member, the uniform logit / probability averages and ME, the learned ones
(``cfg.learn``), every bottleneck objective × constraint set with its smoothed twin
(``cfg.objectives``) and the learned soft ``kl`` (``cfg.learn_bottleneck``).  Every row carries
``dnll``: its paired NLL difference to the tuned simple combiner (the learned average with the
lower validation NLL; the uniform logit average without learning) and its 95 % paired block
bootstrap interval ``ci_low`` / ``ci_high`` (blocks: the targets of one text within one stretch of
``context`` tokens, :func:`jaxens.harness.evaluate.metrics.paired_bootstrap`).

With ``store`` (a folder) every finished row is written as it finishes
(:class:`~jaxens.harness.evaluate.store.RowStore`: ``rows.jsonl``, ``table.md``) and a rerun with
the same configuration and tokens reuses them.  Fewer than :data:`MIN_VAL_ROWS` validation rows
warn (:class:`FewValidationRowsWarning`): the member picked as strongest and the tuned weights can
then be the wrong ones; ``meta`` reports the best member on validation and on test beside the
tuned reference either way.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxens.harness.evaluate.config import EvalConfig
from jaxens.harness.evaluate.learned import learned_average_rows, learned_bottleneck_row
from jaxens.harness.evaluate.metrics import paired_differences, reference_row
from jaxens.harness.evaluate.rows import average_rows, bottleneck_rows, member_rows
from jaxens.harness.evaluate.store import RowStore, run_key
from jaxens.harness.evaluate.windows import collect_logits
from jaxens.harness.members import common_vocab
from jaxens.harness.reports import EvalResult

MIN_VAL_ROWS = 200


class FewValidationRowsWarning(UserWarning):
    """Too few validation rows to pick the strongest member or tune weights reliably."""


def evaluate(
    members: Sequence[Any],
    val_tokens: Sequence[np.ndarray],
    test_tokens: Sequence[np.ndarray],
    config: EvalConfig = EvalConfig(),
    names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
    store=None,
) -> EvalResult:
    """Evaluate every combiner on ``test_tokens`` (one token array per text), tuning on ``val_tokens``.

    Returns an :class:`EvalResult` whose rows carry the metrics of :mod:`jaxens.harness.evaluate`.
    ``store``: a folder for the finished rows (resumed when the configuration and tokens match).
    """
    log = log or (lambda s: None)
    members = list(members)
    n = len(members)
    names = list(names) if names is not None else [f"member{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} members")
    cfg = config
    v = common_vocab(members, cfg.vocab_size)
    rs = RowStore(store, run_key(cfg, names, val_tokens, test_tokens))
    if rs.resumed:
        log(f"resuming: {rs.resumed} finished rows in {store}")
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

    nval = int(val.logits.shape[1])
    if nval < MIN_VAL_ROWS:
        warnings.warn(f"only {nval} validation rows (< {MIN_VAL_ROWS}): the strongest member and the tuned weights "
                      "may be the wrong ones; raise --val-positions (>= 500 rows in all for a reliable choice)",
                      FewValidationRowsWarning, stacklevel=2)
    rows = rs.cached([f"member {x}" for x in names], lambda: member_rows(val, test, names, member_s)[0])
    val_nll = [r["val_nll"] for r in rows]
    best = int(np.argmin(val_nll))
    all_cost = float(np.sum(member_s))
    rows += rs.cached(["logit_average", "prob_average", "me"],
                      lambda: average_rows(test, cfg.batch_rows, all_cost, member_s))
    if cfg.learn:
        rows += rs.cached(["logit_average (learned)", "prob_average (learned)", "me (learned)"],
                          lambda: learned_average_rows(n, val, test, cfg, all_cost, member_s))
    if cfg.objectives:
        rows += bottleneck_rows(members, v, val, test, cfg, best, names, all_cost, log, store=rs)
    if cfg.learn_bottleneck:
        rows += rs.cached(["bn:kl [soft, learned]"],
                          lambda: [learned_bottleneck_row(members, v, val, test, cfg, all_cost, log)])

    ref = reference_row(rows)
    test_best = min((r for r in rows if r["kind"] == "member"), key=lambda r: r["nll"])
    blocks = test.text.astype(np.int64) * (1 << 32) + test.position // cfg.context
    reference = paired_differences(rows, blocks, seed=cfg.seed)
    by_name = {r["combiner"]: r for r in rows}
    meta = {
        "reference": reference,
        "members": names,
        "vocab_size": v,
        "best_member": names[best],
        "best_member_test": test_best["combiner"].removeprefix("member "),
        "reference_val_nll": None if ref is None else ref.get("val_nll"),
        "best_member_vs_reference": None if ref is None else {
            k: by_name[test_best["combiner"]].get(k) for k in ("delta", "ci_low", "ci_high")},
        "interval": "95% paired block bootstrap (2000 draws; blocks: one text's targets within one stretch of "
                    "`context` tokens)",
        "val_rows": int(val.logits.shape[1]),
        "test_rows": int(test.logits.shape[1]),
        "member_seconds_per_token": [float(s) for s in member_s],
        "validation_nll": {names[i]: float(val_nll[i]) for i in range(n)},
        "jax_backend": jax.default_backend(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return EvalResult(rows, dataclasses.asdict(cfg), meta)
