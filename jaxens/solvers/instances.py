r"""Typed problem instances: what an objective hands to a solver (one batch row).

Every instance is a ``NamedTuple`` (a pytree: ``jax.vmap`` it over a batch) of the row's data;
the shared structure (``A``, ``Q``, the hard/soft sets) is the
:class:`~jaxens.problem.BottleneckProblem` passed next to it, so that a solver call reads
``solver.solve(problem, instance, warm)``.  Notation as in :mod:`jaxens.objectives`: the
feasible set :math:`\mathcal F = \{p\in\Delta_v : p_j = 0 \text{ off mask},\ A_H^\top p = m_H\}`,
soft members :math:`S` adding :math:`\sum_{i\in S}\tfrac{\rho_i}2\lVert A_i^\top p - m_i\rVert^2`.

=============================  =====================================================================  ============================
instance                       problem                                                                accepted by
=============================  =====================================================================  ============================
:class:`LinearProgram`         :math:`\min_{p\in\mathcal F} c^\top p`                                 ``WorkingSet``, ``ADMM``, ``EntropicNewton``
:class:`QuadraticProgram`      :math:`\min_{p\in\mathcal F} \tfrac12\lVert F^\top p\rVert^2 + c^\top p`   ``ADMM``
:class:`EntropicProgram`       :math:`\min_{p\in\mathcal F} \mathrm{KL}(p\Vert\mathrm{softmax}(\theta))`  ``EntropicNewton``
:class:`MixtureCrossEntropy`   :math:`\min_{p\in\mathcal F} -\sum_j s_j\log p_j`                      ``CrossEntropyNewton``
:class:`RatioProgram`          :math:`\min_{p\in\mathcal F}\max_j p_j / r_j`                          ``RatioIPM``, ``ADMM``
:class:`LeastSquaresProgram`   :math:`\min_{p\in\Delta_v,\ p\le u}\lVert A_H^\top p - m_H\rVert^2` (+ certificate)  ``LeastSquares``
:class:`PenalisedProgram`      :math:`\min_{p\in\Delta_v,\ p\le u} \tfrac12\lVert F^\top p\rVert^2 + c^\top p + \tfrac h2\lVert A_H^\top p - m_H\rVert^2`  ``FISTA``
=============================  =====================================================================  ============================

(``+ soft`` terms in every row but :class:`RatioProgram` and :class:`LeastSquaresProgram`.)
``m`` is always all members' moments :math:`A^\top\hat p` of the row, ``(D,)``; ``mask`` the
tokens that may get mass, ``(v,)``; ``rho`` one weight per member, ``(n,)`` (``None``: ones,
where the solver allows it).  ``ub`` optional caps :math:`p\le u`.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Bool, Float


class LinearProgram(NamedTuple):
    """``sum_ce``: :math:`\\min_{p\\in\\mathcal F} c^\\top p` (+ soft)."""

    c: Float[Array, " v"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    rho: Float[Array, " n"] | None = None


class QuadraticProgram(NamedTuple):
    """``sum_sq_ce``: :math:`\\min_{p\\in\\mathcal F,\\ p\\le u} \\tfrac12\\lVert F^\\top p\\rVert^2 + c^\\top p` (+ soft);
    ``F`` is ``v x k`` (``k`` may be 0: an LP)."""

    c: Float[Array, " v"]
    F: Float[Array, "v k"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    rho: Float[Array, " n"]
    ub: Float[Array, " v"] | None = None


class EntropicProgram(NamedTuple):
    """``kl`` / ``max_entropy``: :math:`\\min_{p\\in\\mathcal F} \\mathrm{KL}(p\\Vert\\mathrm{softmax}_{\\text{mask}}(\\theta))`
    (+ soft); :math:`\\theta = -\\infty` also removes a token."""

    theta: Float[Array, " v"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    rho: Float[Array, " n"] | None = None


class MixtureCrossEntropy(NamedTuple):
    """``cross_entropy``: :math:`\\min_{p\\in\\mathcal F} -\\sum_j s_j\\log p_j` (+ soft) with the
    mixture :math:`s = \\sum_i w_i\\hat p_i` (``weights``: the per-token mixture mass ``s``)."""

    weights: Float[Array, " v"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    rho: Float[Array, " n"] | None = None


class RatioProgram(NamedTuple):
    """``min_underestimation``: :math:`\\min s` s.t. :math:`p\\in\\mathcal F,\\ 0\\le p_j\\le s\\,r_j`,
    i.e. :math:`\\min_{p\\in\\mathcal F}\\max_j p_j / r_j`."""

    r: Float[Array, " v"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]


class LeastSquaresProgram(NamedTuple):
    """``least_squares``: :math:`\\min_{p\\in\\Delta_v,\\ p_j=0 \\text{ off mask},\\ p\\le u}\\lVert A_H^\\top p - m_H\\rVert^2`
    with a Farkas certificate of infeasibility (:mod:`jaxens.solvers.least_squares`)."""

    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    ub: Float[Array, " v"] | None = None


class PenalisedProgram(NamedTuple):
    """FISTA's problem: the simplex (mask, caps) with the hard block penalised, not imposed:
    :math:`\\min \\tfrac12\\lVert F^\\top p\\rVert^2 + c^\\top p + \\text{soft} + \\tfrac h2\\lVert A_H^\\top p - m_H\\rVert^2`
    (``hard_weight = 2`` with ``c = 0``, ``F`` empty is the least-squares objective)."""

    c: Float[Array, " v"]
    F: Float[Array, "v k"]
    mask: Bool[Array, " v"]
    m: Float[Array, " D"]
    rho: Float[Array, " n"]
    hard_weight: float | Float[Array, ""] = 0.0
    ub: Float[Array, " v"] | None = None


INSTANCES = (
    LinearProgram,
    QuadraticProgram,
    EntropicProgram,
    MixtureCrossEntropy,
    RatioProgram,
    LeastSquaresProgram,
    PenalisedProgram,
)

# instance type -> the solvers that accept it (names: this module imports no solver)
ACCEPTED_BY: dict[type, tuple[str, ...]] = {
    LinearProgram: ("WorkingSet", "ADMM", "EntropicNewton"),
    QuadraticProgram: ("WorkingSet", "ADMM"),
    EntropicProgram: ("EntropicNewton",),
    MixtureCrossEntropy: ("CrossEntropyNewton",),
    RatioProgram: ("RatioIPM", "ADMM"),
    LeastSquaresProgram: ("LeastSquares",),
    PenalisedProgram: ("FISTA",),
}
