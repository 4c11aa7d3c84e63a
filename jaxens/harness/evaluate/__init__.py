r"""Teacher-forced evaluation of ensembles on held-out text (``jaxens eval``).

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
members hard (infeasible rows are counted), the strongest member (lowest
validation NLL) hard only, and all members soft with strength ``rho``.  Each bottleneck row also
appears smoothed, :math:`(1-\lambda)p^\star + \lambda\,\mathrm{softmax}(\sum_i w_i \log\hat p_i)`,
with :math:`\lambda` chosen on the validation split from a grid; the smoothing needs no new
solve (``p*`` does not depend on :math:`\lambda`), and equals the ``lam`` option of
:func:`jaxens.bottleneck`.  Optionally the ``kl`` objective with soft constraints is learned
end to end (weights, per-member ``rho``, ``lambda``) through the solver's implicit adjoint.

Everything is deterministic given ``seed`` except the ``tok_s`` column.

Modules: :mod:`~.config` (:class:`EvalConfig`), :mod:`~.windows` (positions, windows, cached
logits), :mod:`~.metrics`, :mod:`~.combine` (running a combiner over cached rows),
:mod:`~.rows` (the table rows and their solvers), :mod:`~.learned` (rows learned on validation),
:mod:`~.run` (:func:`evaluate`); the report writers are :mod:`jaxens.harness.reports`.
"""

from jaxens.harness.data import encode, read_text, split_part, split_tokens
from jaxens.harness.evaluate.combine import (
    CombinerRun,
    feasibility_rows,
    jit_combiner,
    run_combiner,
    run_feasible_rows,
)
from jaxens.harness.evaluate.config import (
    CONSTRAINT_SETS,
    DEFAULT_MEMBERS,
    DEFAULT_TEXTS,
    ECE_BINS,
    LAMBDA_GRID,
    SPLITS,
    EvalConfig,
)
from jaxens.harness.evaluate.metrics import (
    METRICS,
    RowScores,
    expected_calibration_error,
    paired_differences,
    row_scores,
    smooth_logp,
    smooth_target_logp,
    summarize,
)
from jaxens.harness.evaluate.rows import least_squares_solver, make_row, solver_for, unembeddings
from jaxens.harness.evaluate.run import evaluate
from jaxens.harness.evaluate.windows import EvalData, choose_targets, collect_logits, window_start
from jaxens.harness.members import common_vocab
from jaxens.harness.reports import EvalResult, eval_table, json_safe, write_json
from jaxens.harness.plots import plot_eval as plot

__all__ = [
    "CONSTRAINT_SETS", "CombinerRun", "DEFAULT_MEMBERS", "DEFAULT_TEXTS", "ECE_BINS", "EvalConfig", "EvalData",
    "EvalResult", "LAMBDA_GRID", "METRICS", "RowScores", "SPLITS", "choose_targets", "collect_logits",
    "common_vocab", "encode", "eval_table", "evaluate", "expected_calibration_error", "feasibility_rows",
    "jit_combiner", "json_safe", "least_squares_solver", "make_row", "paired_differences", "plot", "read_text",
    "row_scores", "run_combiner", "run_feasible_rows", "smooth_logp", "smooth_target_logp", "solver_for",
    "split_part", "split_tokens", "summarize", "unembeddings", "window_start", "write_json",
]
