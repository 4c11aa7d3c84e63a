r"""Status-contract violations of the bottleneck combiner on the non-degenerate Gaussian family.

``python benchmarks/robustness.py --families`` runs this (``--family-v``, ``--family-rows``).
Every row of :func:`benchmarks.instances.gaussian` is feasible (the target :math:`p^\star` is a
witness) and its cost has a part off :math:`\operatorname{span}[A, 1]` (the benchmark refuses the
family if a row's degeneracy :math:`\delta < 10^{-3}`).  Each objective runs through
:func:`jaxens.combiners.bottleneck.bottleneck` with its default solver, every member hard, and
each row is checked against a reference optimum in float64:

* ``sum_ce`` (LP) and ``min_underestimation`` (the LP :math:`\min t` s.t. :math:`p_j \le t r_j`):
  HiGHS through ``scipy.optimize.linprog(method="highs")``;
* ``sum_sq_ce`` (QP), ``kl``, ``max_entropy``, ``cross_entropy``: cvxpy with Clarabel;
* ``least_squares``: the optimum is 0 on a feasible row (its residual is the check).

**Violations** (counted per objective and family):

* ``solved_gap``: status ``SOLVED`` but the relative objective gap
  :math:`(f(p) - f^\star) / \max(1, |f^\star|)` exceeds 10x the solver's stated tolerance
  (:data:`GAP_TOL`: ADMM's ``tol_rel``, the Newton solvers' and ``RatioIPM``'s ``tol``, floored at
  the reference's own accuracy 1e-7);
* ``solved_residual``: status ``SOLVED`` but :math:`\lVert A^\top p - m\rVert_\infty`, recomputed in
  float64, exceeds 10x the documented bound ``residual_tol`` (``docs/numerics.md``);
* ``nan_status``: a NaN in ``p`` under any status but ``NUMERICAL_ERROR`` / ``NONFINITE_INPUT``;
* ``infeasible_unconverged``: status ``INFEASIBLE`` whose certificate margin, recomputed in
  float64, is not positive (no converged relaxation).

Also reported, not counted as violations: ``infeasible_on_feasible`` (status ``INFEASIBLE`` on a
row that is feasible by construction) and the status histogram (``MAX_ITERS`` is an honest
answer).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np

from instances import gaussian, log_softmax, refuse_degenerate

GAP_TOL = {  # the solvers' stated tolerances (jaxens/solvers/defaults.py), floored at 1e-7
    "sum_ce": {"float32": 1e-5, "float64": 1e-6},  # ADMM tol_rel
    "sum_sq_ce": {"float32": 1e-5, "float64": 1e-6},
    "min_underestimation": {"float32": 5e-5, "float64": 1e-7},  # RatioIPM tol (1e-9 in float64; floor 1e-7)
    "kl": {"float32": 1e-5, "float64": 1e-7},  # EntropicNewton tol (1e-10 in float64; floor 1e-7)
    "max_entropy": {"float32": 1e-5, "float64": 1e-7},
    "cross_entropy": {"float32": 1e-5, "float64": 1e-7},  # CrossEntropyNewton tol
    "least_squares": {"float32": np.inf, "float64": np.inf},  # optimum 0: the residual is the check
}
FACTOR = 10.0
VIOLATIONS = ("solved_gap", "solved_residual", "nan_status", "infeasible_unconverged")


def objective_value(objective: str, p: np.ndarray, logp: np.ndarray) -> float:
    """``f(p)`` in float64 for member log-probs ``logp`` ``(n, v)`` and uniform weights."""
    n = logp.shape[0]
    if objective == "least_squares":
        return 0.0  # its optimum on a feasible row; the residual is the check
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum()
        if objective == "sum_ce":
            return float(-(logp @ p).mean())
        if objective == "sum_sq_ce":
            return float(((logp @ p) ** 2).sum() / n)
        if objective == "kl":
            return float(plogp - (logp @ p).mean())
        if objective == "max_entropy":
            return float(plogp)
        if objective == "cross_entropy":
            s = np.exp(logp).mean(0)
            return float(-(s * np.log(np.maximum(p, 1e-300))).sum())
        if objective == "min_underestimation":
            r = np.exp(logp.min(0) - logp.min(0).max())
            return float(np.max(p / r))
    raise ValueError(objective)


def reference_value(objective: str, A: np.ndarray, m: np.ndarray, logp: np.ndarray) -> float:
    """The optimum ``f*`` of the row (HiGHS for the LPs, cvxpy/Clarabel otherwise)."""
    from scipy.optimize import linprog

    v, D = A.shape
    n = logp.shape[0]
    A_eq = np.concatenate([A, np.ones((v, 1))], axis=1).T
    b_eq = np.concatenate([m, [1.0]])
    if objective == "least_squares":
        return 0.0
    if objective == "sum_ce":
        r = linprog(-logp.mean(0), A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
        assert r.status == 0, r.message
        return float(r.fun)
    if objective == "min_underestimation":  # min t  s.t.  p_j <= t r_j
        rr = np.exp(logp.min(0) - logp.min(0).max())
        cost = np.concatenate([np.zeros(v), [1.0]])
        A_ub = np.concatenate([np.eye(v), -rr[:, None]], axis=1)
        A_eq2 = np.concatenate([A_eq, np.zeros((D + 1, 1))], axis=1)
        r = linprog(cost, A_ub=A_ub, b_ub=np.zeros(v), A_eq=A_eq2, b_eq=b_eq, bounds=(0, None), method="highs")
        assert r.status == 0, r.message
        return float(r.fun)
    import cvxpy as cp

    p = cp.Variable(v, nonneg=True)
    cons = [A.T @ p == m, cp.sum(p) == 1]
    if objective == "sum_sq_ce":
        f = cp.sum_squares(logp @ p) / n
    elif objective == "kl":
        f = -cp.sum(cp.entr(p)) - logp.mean(0) @ p
    elif objective == "max_entropy":
        f = -cp.sum(cp.entr(p))
    elif objective == "cross_entropy":
        f = -np.exp(logp).mean(0) @ cp.log(p)
    else:
        raise ValueError(objective)
    prob = cp.Problem(cp.Minimize(f), cons)
    prob.solve(solver=cp.CLARABEL)
    assert prob.status == "optimal", prob.status
    return float(prob.value)


def check_family(objective: str, dtype: str, inst, solve_batch, residual_tol, Status) -> dict[str, Any]:
    """Run one family through one objective; the violation counts and the worst ratios."""
    t0 = time.perf_counter()
    p, sol = solve_batch(objective, dtype, inst.Ws, inst.logits)
    seconds = time.perf_counter() - t0
    A = inst.A
    v = A.shape[0]
    rtol = residual_tol(objective, dtype, v, A)
    gtol = GAP_TOL[objective][dtype]
    counts = Counter({k: 0 for k in VIOLATIONS + ("infeasible_on_feasible",)})
    status_hist: Counter = Counter()
    worst_gap = worst_res = 0.0
    examples = []
    moments = inst.moments()
    for b in range(inst.logits.shape[0]):
        status = Status(int(sol["status"][b]))
        status_hist[status.name] += 1
        pb = p[b]
        if not np.all(np.isfinite(pb)):
            if status not in (Status.NUMERICAL_ERROR, Status.NONFINITE_INPUT):
                counts["nan_status"] += 1
            continue
        lp = log_softmax(inst.logits[b])
        m = moments[b]
        res = float(np.max(np.abs(A.T @ pb - m)))
        if status == Status.INFEASIBLE:
            counts["infeasible_on_feasible"] += 1
            dvec = sol["certificate"][b].astype(np.float64)
            if not float(dvec @ m - np.max(A @ dvec)) > 0:
                counts["infeasible_unconverged"] += 1
        if status != Status.SOLVED:
            continue
        f_ref = reference_value(objective, A, m, lp)
        gap = (objective_value(objective, pb, lp) - f_ref) / max(1.0, abs(f_ref))
        worst_gap = max(worst_gap, gap / gtol if np.isfinite(gtol) else 0.0)
        worst_res = max(worst_res, res / rtol)
        if gap > FACTOR * gtol:
            counts["solved_gap"] += 1
            examples.append(dict(row=b, kind="gap", gap=gap, tol=gtol, reported_gap=float(sol["gap"][b]),
                                 iterations=int(sol["iterations"][b])))
        if res > FACTOR * rtol:
            counts["solved_residual"] += 1
            examples.append(dict(row=b, kind="residual", residual=res, tol=rtol))
    return dict(family=inst.name, objective=objective, dtype=dtype, rows=int(inst.logits.shape[0]),
                min_delta=float(np.min(inst.delta)), violations={k: counts[k] for k in VIOLATIONS},
                infeasible_on_feasible=counts["infeasible_on_feasible"], status=dict(status_hist),
                worst_gap_over_tol=worst_gap, worst_residual_over_tol=worst_res, gap_tol=gtol,
                residual_tol=rtol, seconds=seconds, examples=examples[:5])


def run_families(objectives, dtypes, vs, rows: int, n: int, d: int, seed: int, solve_batch, residual_tol,
                 Status) -> list[dict[str, Any]]:
    """Every (family size, dtype, objective): :func:`check_family`, printed as it goes."""
    out = []
    for v in vs:
        inst = gaussian(v, n, d, rows, seed=seed)
        refuse_degenerate(inst.delta, inst.name)
        for dtype in dtypes:
            for objective in objectives:
                r = check_family(objective, dtype, inst, solve_batch, residual_tol, Status)
                print(f"{inst.name} {dtype} {objective:20s} violations={r['violations']} "
                      f"INFEASIBLE-on-feasible={r['infeasible_on_feasible']} status={r['status']} "
                      f"worst gap/tol={r['worst_gap_over_tol']:.3g} worst res/tol={r['worst_residual_over_tol']:.3g} "
                      f"({r['seconds']:.1f}s)", flush=True)
                out.append(r)
    return out
