"""The evaluation: cache the member logits of both splits, then score every combiner's rows.

:func:`evaluate` returns an :class:`jaxens.harness.reports.EvalResult` whose rows are, in order:
each member, the uniform logit / probability averages and ME, the learned ones
(``cfg.learn``), every bottleneck objective × constraint set with its smoothed twin
(``cfg.objectives``) and the learned soft ``kl`` (``cfg.learn_bottleneck``).  Every row carries
``dnll``: its paired NLL difference to the tuned simple combiner (the learned average with the
lower validation NLL; the uniform logit average without learning).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxens.harness.evaluate.config import EvalConfig
from jaxens.harness.evaluate.learned import learned_average_rows, learned_bottleneck_row
from jaxens.harness.evaluate.metrics import paired_differences
from jaxens.harness.evaluate.rows import average_rows, bottleneck_rows, member_rows
from jaxens.harness.evaluate.windows import collect_logits
from jaxens.harness.members import common_vocab
from jaxens.harness.reports import EvalResult


def evaluate(
    members: Sequence[Any],
    val_tokens: Sequence[np.ndarray],
    test_tokens: Sequence[np.ndarray],
    config: EvalConfig = EvalConfig(),
    names: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Evaluate every combiner on ``test_tokens`` (one token array per text), tuning on ``val_tokens``.

    Returns an :class:`EvalResult` whose rows carry the metrics of :mod:`jaxens.harness.evaluate`.
    """
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

    rows, val_nll = member_rows(val, test, names, member_s)
    best = int(np.argmin(val_nll))
    all_cost = float(np.sum(member_s))
    rows += average_rows(test, cfg.batch_rows, all_cost, member_s)
    if cfg.learn:
        rows += learned_average_rows(n, val, test, cfg, all_cost, member_s)
    if cfg.objectives:
        rows += bottleneck_rows(members, v, val, test, cfg, best, names, all_cost, log)
    if cfg.learn_bottleneck:
        rows.append(learned_bottleneck_row(members, v, val, test, cfg, all_cost, log))

    reference = paired_differences(rows)
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
