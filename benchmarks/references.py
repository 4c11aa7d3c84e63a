"""Reference solvers for the bottleneck LP/QP (benchmarks and tests only; never imported by jaxens).

All solve the same instance:  min c.p (+ 0.5 ||F^T p||^2)  s.t.  A^T p = m, sum(p) = 1, 0 <= p <= ub.
Each returns (p, seconds, status string).
"""

from __future__ import annotations

import time

import numpy as np


def highs_lp(A: np.ndarray, m: np.ndarray, c: np.ndarray, ub: np.ndarray | None = None,
             method: str = "highs", time_limit: float = 1800.0):
    """HiGHS through ``scipy.optimize.linprog`` (``method``: highs / highs-ds / highs-ipm)."""
    from scipy.optimize import linprog

    v, D = A.shape
    A_eq = np.concatenate([A, np.ones((v, 1))], axis=1).T
    b_eq = np.concatenate([m, [1.0]])
    bounds = (0, None) if ub is None else list(zip(np.zeros(v), ub))
    t0 = time.perf_counter()
    r = linprog(c, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method=method, options=dict(time_limit=time_limit))
    dt = time.perf_counter() - t0
    status = {0: "Optimal", 1: "Iteration/time limit", 2: "Infeasible", 3: "Unbounded", 4: "Numerical"}[r.status]
    return (np.asarray(r.x) if r.status == 0 else None), dt, status


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
