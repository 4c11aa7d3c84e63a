"""Reference solvers for the bottleneck LP/QP (benchmarks and tests only; never imported by jaxens).

All solve the same instance:  min c.p (+ 0.5 ||F^T p||^2)  s.t.  A^T p = m, sum(p) = 1, 0 <= p <= ub.
Each returns (p, seconds, status string).
"""

from __future__ import annotations

import time

import numpy as np


def highs_lp(A: np.ndarray, m: np.ndarray, c: np.ndarray, ub: np.ndarray | None = None, tol: float = 1e-9):
    """HiGHS (through highspy) on the dense LP; dual simplex by default."""
    import highspy

    v, D = A.shape
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("primal_feasibility_tolerance", tol)
    h.setOptionValue("dual_feasibility_tolerance", tol)
    lp = highspy.HighsLp()
    lp.num_col_ = v
    lp.num_row_ = D + 1
    lp.col_cost_ = np.asarray(c, np.float64)
    lp.col_lower_ = np.zeros(v)
    lp.col_upper_ = np.full(v, np.inf) if ub is None else np.asarray(ub, np.float64)
    rhs = np.concatenate([m, [1.0]])
    lp.row_lower_ = rhs
    lp.row_upper_ = rhs
    M = np.concatenate([A, np.ones((v, 1))], axis=1)  # column j of the LP = row j of M
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, v * (D + 1) + 1, D + 1, dtype=np.int32)
    lp.a_matrix_.index_ = np.tile(np.arange(D + 1, dtype=np.int32), v)
    lp.a_matrix_.value_ = M.reshape(-1)
    h.passModel(lp)
    t0 = time.perf_counter()
    h.run()
    dt = time.perf_counter() - t0
    status = h.modelStatusToString(h.getModelStatus())
    sol = h.getSolution()
    p = np.asarray(sol.col_value) if status == "Optimal" else None
    return p, dt, status


def osqp_lp(A, m, c, eps=1e-5, max_iter=20000, F=None):
    """OSQP (CPU, sparse factorisation of the KKT system) on the same LP/QP."""
    import osqp
    import scipy.sparse as sp

    v, D = A.shape
    P = sp.csc_matrix((v, v)) if F is None else sp.csc_matrix(F @ F.T)
    Cm = sp.vstack([sp.csc_matrix(np.concatenate([A, np.ones((v, 1))], axis=1).T), sp.eye(v)], format="csc")
    rhs = np.concatenate([m, [1.0]])
    lo = np.concatenate([rhs, np.zeros(v)])
    hi = np.concatenate([rhs, np.full(v, np.inf)])
    s = osqp.OSQP()
    s.setup(P, np.asarray(c, np.float64), Cm, lo, hi, eps_abs=eps, eps_rel=eps, max_iter=max_iter, verbose=False,
            polishing=True)
    t0 = time.perf_counter()
    r = s.solve()
    dt = time.perf_counter() - t0
    return np.asarray(r.x), dt, str(r.info.status)


def jaxopt_boxosqp_lp(A, m, c, tol=1e-5, maxiter=20000):
    """jaxopt's BoxOSQP (JAX ADMM, matrix-free) on the same LP; timed after a warm-up compile."""
    import warnings

    import jax
    import jax.numpy as jnp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jaxopt import BoxOSQP

    v, D = A.shape
    Cmat = jnp.asarray(np.concatenate([A, np.ones((v, 1))], axis=1).T)
    rhs = jnp.asarray(np.concatenate([m, [1.0]]))

    def matvec_Q(params, x):
        return jnp.zeros_like(x)

    def matvec_A(params, x):
        return jnp.concatenate([Cmat @ x, x])

    solver = BoxOSQP(matvec_Q=matvec_Q, matvec_A=matvec_A, tol=tol, maxiter=maxiter, jit=True)
    lo = jnp.concatenate([rhs, jnp.zeros(v)])
    hi = jnp.concatenate([rhs, jnp.full(v, jnp.inf)])
    run = jax.jit(lambda c_: solver.run(params_obj=(None, c_), params_eq=None, params_ineq=(lo, hi)))
    out = run(jnp.asarray(c))
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out = run(jnp.asarray(c))
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    return np.asarray(out.params.primal[0]), dt, f"status={int(out.state.status)} iters={int(out.state.iter_num)}"


def cvxpy_lp(A, m, c):
    import cvxpy as cp

    v, D = A.shape
    p = cp.Variable(v, nonneg=True)
    prob = cp.Problem(cp.Minimize(c @ p), [A.T @ p == m, cp.sum(p) == 1])
    t0 = time.perf_counter()
    prob.solve()
    dt = time.perf_counter() - t0
    return (None if p.value is None else np.asarray(p.value)), dt, prob.status
