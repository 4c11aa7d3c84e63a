"""min_underestimation LP: RatioIPM vs ADMM vs HiGHS on the non-degenerate Gaussian family.

Rows: :func:`benchmarks.instances.gaussian` (``v`` tokens, ``n`` members of ``d`` columns, every
member hard; feasible and non-degenerate), ``r = min_i p_i`` scaled to ``max r = 1`` as
:func:`jaxens.objectives.underestimation_bound` does.  The reference optimum ``s*`` is HiGHS
(``scipy.optimize.linprog(method="highs")``, sparse ``p - s r <= 0``), timed per row.  The jaxens
solvers run one ``jit(vmap)`` call over the batch (timed after a compile call: the best of
``--repeats``); the gap of a row is ``(s(p) - s*) / s*`` with ``s(p) = max_j p_j / r_j`` of the
returned ``p`` in float64, and "matched" says whether every row's ``|gap| <= 1e-4``.

    python benchmarks/ratio.py                                    # v 1024 4096, n*d 128 256, batch 8
    python benchmarks/ratio.py --v 1024 --nd 128 --solvers ipm    # a quick one

ADMM runs only at ``--admm-v`` (default 1024: it takes its 10,000 / 50,000 iterations).

Prints a table and writes ``results/ratio.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from instances import gaussian, log_softmax, refuse_degenerate  # noqa: E402

MATCH = 1e-4


def highs_ratio(A, m, r):
    import scipy.sparse as sp
    from scipy.optimize import linprog

    v, D = A.shape
    A_eq = sp.csr_matrix(np.hstack([np.vstack([A.T, np.ones((1, v))]), np.zeros((D + 1, 1))]))
    A_ub = sp.hstack([sp.eye(v), sp.csr_matrix(-r[:, None])]).tocsr()
    cost = np.zeros(v + 1)
    cost[-1] = 1.0
    t0 = time.perf_counter()
    res = linprog(cost, A_ub=A_ub, b_ub=np.zeros(v), A_eq=A_eq, b_eq=np.concatenate([m, [1.0]]),
                  bounds=(0, None), method="highs")
    dt = time.perf_counter() - t0
    assert res.status == 0, res.message
    return float(res.fun), dt


def run_solver(name, solver, Ws, R, M, dtype, repeats):
    from jaxens import make_problem
    from jaxens.solvers.instances import RatioProgram

    prob = make_problem(Ws, dtype=dtype)
    v = R.shape[1]
    f = jax.jit(jax.vmap(lambda r, m: solver.solve(prob, RatioProgram(r, jnp.ones(v, bool), m))[0]))
    Rj, Mj = jnp.asarray(R, dtype), jnp.asarray(M, dtype)
    t0 = time.perf_counter()
    sol = jax.block_until_ready(f(Rj, Mj))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = jax.block_until_ready(f(Rj, Mj))
        times.append(time.perf_counter() - t0)
    return sol, min(times), compile_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--nd", type=int, nargs="*", default=[128, 256], help="n * d (d = 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--solvers", nargs="*", default=["ipm", "admm"])
    ap.add_argument("--admm-v", type=int, nargs="*", default=[1024], help="sizes ADMM runs at (slow)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/ratio.json")
    args = ap.parse_args(argv)
    if "float64" in args.dtypes:
        jax.config.update("jax_enable_x64", True)
    from jaxens.solvers.admm import ADMM
    from jaxens.solvers.ratio_ipm import RatioIPM
    from jaxens.solvers.solution import Status

    solvers = {"ipm": ("RatioIPM", RatioIPM()), "admm": ("ADMM", ADMM())}
    rows = []
    d = 16
    for v in args.v:
        for nd in args.nd:
            n = nd // d
            inst = gaussian(v, n, d, args.batch, seed=args.seed)
            refuse_degenerate(inst.delta, inst.name)
            A, M = inst.A, inst.moments()
            R = np.stack([np.exp(lp.min(0) - lp.min(0).max()) for lp in log_softmax(inst.logits)])
            ref = [highs_ratio(A, M[b], R[b]) for b in range(args.batch)]
            s_ref = np.array([x[0] for x in ref])
            t_highs = float(sum(x[1] for x in ref))
            base = dict(family=inst.name, v=v, n=n, d=d, batch=args.batch)
            rows.append(dict(base, solver="HiGHS", dtype="float64", seconds=t_highs, max_abs_gap=0.0,
                             matched=True, status={"Optimal": args.batch}, iterations=None, compile_s=0.0))
            print(f"{inst.name}: HiGHS {t_highs:.3f}s for {args.batch} rows", flush=True)
            for dtype_name in args.dtypes:
                dtype = jnp.float32 if dtype_name == "float32" else jnp.float64
                for key in args.solvers:
                    label, solver = solvers[key]
                    if key == "admm" and v not in args.admm_v:
                        continue
                    sol, sec, comp = run_solver(label, solver, inst.Ws, R, M, dtype, args.repeats)
                    p = np.asarray(sol.p, np.float64)
                    s = np.max(p / R, axis=1)
                    gap = (s - s_ref) / s_ref
                    st = {}
                    for code in np.asarray(sol.status).tolist():
                        st[Status(int(code)).name] = st.get(Status(int(code)).name, 0) + 1
                    row = dict(base, solver=label, dtype=dtype_name, seconds=sec, compile_s=comp,
                               max_abs_gap=float(np.max(np.abs(gap))), matched=bool(np.all(np.abs(gap) <= MATCH)),
                               status=st, iterations=int(np.max(np.asarray(sol.iterations))),
                               reported_gap_max=float(np.max(np.asarray(sol.gap))),
                               residual_max=float(np.max(np.asarray(sol.primal_residual))))
                    rows.append(row)
                    print(f"{inst.name} {dtype_name} {label}: {sec:.3f}s (compile {comp:.1f}s) max|gap| "
                          f"{row['max_abs_gap']:.1e} matched={row['matched']} status={st} iters<={row['iterations']}",
                          flush=True)
    print()
    print("| v | n·d | solver | dtype | seconds (batch) | × HiGHS | max rel gap vs HiGHS | matched (≤1e-4) | statuses | iterations (max) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rw in rows:
        h = next(x for x in rows if x["family"] == rw["family"] and x["solver"] == "HiGHS")
        speed = h["seconds"] / rw["seconds"] if rw["seconds"] > 0 else float("nan")
        stat = ", ".join(f"{k} {c}" for k, c in rw["status"].items())
        print(f"| {rw['v']} | {rw['n'] * rw['d']} | {rw['solver']} | {rw['dtype']} | {rw['seconds']:.3f} | "
              f"{speed:.1f} | {rw['max_abs_gap']:.1e} | {'yes' if rw['matched'] else 'no'} | {stat} | "
              f"{rw['iterations'] if rw['iterations'] is not None else '–'} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = dict(command=" ".join(["python"] + sys.argv), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=f"{platform.processor() or platform.machine()} x{os.cpu_count()} ({platform.platform()})",
                jax=jax.__version__, backend=jax.default_backend(), match_tol=MATCH)
    old = []
    if os.path.exists(args.out):  # runs accumulate: a row replaces the earlier one of its key
        with open(args.out) as fh:
            old = json.load(fh).get("rows", [])
    keys = {(r["family"], r["solver"], r["dtype"]) for r in rows}
    for r in rows:
        r["command"] = meta["command"]
    rows = [r for r in old if (r["family"], r["solver"], r["dtype"]) not in keys] + rows
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
