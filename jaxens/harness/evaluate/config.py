"""Settings of one teacher-forced evaluation (:class:`EvalConfig`) and the harness's defaults."""

from __future__ import annotations

import dataclasses

from jaxens.harness.data import SPLITS
from jaxens.objectives import OBJECTIVES

__all__ = ["CONSTRAINT_SETS", "DEFAULT_MEMBERS", "DEFAULT_TEXTS", "ECE_BINS", "EvalConfig", "LAMBDA_GRID", "SPLITS"]

DEFAULT_TEXTS = ("alice29.txt", "asyoulik.txt")
DEFAULT_MEMBERS = ("smollm2-135m", "smollm2-tiny-64", "smollm2-tiny-128", "smollm2-tiny-256")
CONSTRAINT_SETS = ("all", "best", "soft")
LAMBDA_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
ECE_BINS = 15


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
        of ``O(v k^2)``).
      max_iters: iteration cap of ADMM where it is the solver (no objective's default now:
        ``sum_ce`` / ``sum_sq_ce`` use :class:`jaxens.WorkingSet`, ``min_underestimation``
        :class:`jaxens.RatioIPM`, the least-squares phase Wolfe's minimum-norm point, each with its
        own cap) (``None``: the solvers' own caps,
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
