"""The bottleneck LP (``sum_ce``) on non-degenerate instances: jaxens vs HiGHS, MPAX and ADMM.

Every solver gets the same row: ``min c.p  s.t.  A_H^T p = m_H, sum(p) = 1, p >= 0``.  Each
family prints its degeneracy measure (``benchmarks/instances.py``: 0 = the cost is constant on
the feasible set) and the run refuses rows below 1e-3.  Families:

* ``gaussian``: Gaussian ``W_i``, member logits ``W_i h_i + N(0,1)`` fitted to one ``p*``'s
  moments (feasible, cost off the span);
* ``real``: SmolLM2-135M's unembedding (hard) and real contexts from the shared texts, with the
  trained ``smollm2-tiny-64`` member unconstrained (its part of the cost is off SmolLM2's span).

jaxens rows are one vmapped, jit-compiled batch, timed after a warm-up call; HiGHS (through
scipy) and MPAX (raPDHG, jit-compiled, timed after a warm-up) solve ``--ref-rows`` rows one at a
time: their per-row time does not depend on the batch.  Accuracy is matched: a row counts as
solved when its objective is within 1e-4 (relative) of HiGHS's optimum and
``||A_H^T p - m_H||_inf <= 1e-5 max(1, ||m_H||_inf)``; jaxens also reports its own certified gap
on every row.  Ratios are throughput ratios (rows per second) measured in the same run.

    python benchmarks/solvers.py                                   # v=16384, nd=256, batch 1 and 8
    python benchmarks/solvers.py --family gaussian --v 8192 16384 49152 --nd 128 256 642 --batch 1 8 32
    python benchmarks/solvers.py --family real --batch 8 32

Writes ``results/solvers.json`` (one record per configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxens  # noqa: E402
from jaxens.solvers.admm import ADMM  # noqa: E402
from jaxens.solvers.instances import LinearProgram  # noqa: E402
from jaxens.solvers.working_set import WorkingSet  # noqa: E402
from instances import gaussian, real_rows, refuse_degenerate  # noqa: E402
from references import highs_lp  # noqa: E402


def run_jaxens(solver, problem, c, m, mask):
    """``(Solution, seconds)`` of one batch (timed after a warm-up call)."""
    row = lambda P, ci, mi, ki: solver.solve(P, LinearProgram(ci, ki, mi))[0]  # noqa: E731
    fn = jax.jit(jax.vmap(row, in_axes=(None, 0, 0, 0)))
    args = (problem, jnp.asarray(c, problem.A.dtype), jnp.asarray(m, problem.A.dtype), jnp.asarray(mask))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sol = jax.block_until_ready(fn(*args))
    return sol, time.perf_counter() - t0, compile_s


def run_mpax(A, m, c, eps=1e-4, limit=200000):
    """MPAX's raPDHG (restarted PDHG in JAX) on one row; ``(p, seconds, status)``."""
    import mpax

    v = A.shape[0]
    Aeq = jnp.asarray(np.concatenate([A, np.ones((v, 1))], axis=1).T)
    beq = jnp.asarray(np.concatenate([m, [1.0]]))
    lp = mpax.create_lp(jnp.asarray(c), Aeq, beq, jnp.zeros((0, v)), jnp.zeros((0,)), jnp.zeros(v),
                        jnp.full(v, jnp.inf), use_sparse_matrix=False)
    solver = mpax.raPDHG(eps_abs=eps, eps_rel=eps, iteration_limit=limit, verbose=False)
    fn = jax.jit(solver.optimize)
    jax.block_until_ready(fn(lp))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(lp))
    dt = time.perf_counter() - t0
    return np.asarray(out.primal_solution, np.float64), dt, f"{int(out.termination_status)} iters={int(out.iteration_count)}"


def build(family, v, nd, batch, seed):
    if family == "gaussian":
        n = 4 if nd in (128, 256) else 2
        inst = gaussian(v, n, nd // n, batch, seed=seed)
        hard = list(range(n))
    else:
        inst = real_rows(batch, seed=seed)
        hard = [0]
    return inst, hard


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("gaussian", "real"), default="gaussian")
    ap.add_argument("--v", type=int, nargs="*", default=[16384])
    ap.add_argument("--nd", type=int, nargs="*", default=[256])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--ref-rows", type=int, default=2, help="rows solved by HiGHS (and MPAX) per configuration")
    ap.add_argument("--highs-time-limit", type=float, default=900.0)
    ap.add_argument("--mpax", action="store_true", help="also time MPAX raPDHG (eps 1e-4)")
    ap.add_argument("--admm", action="store_true", help="also time jaxens ADMM (the former default)")
    ap.add_argument("--out", default="results/solvers.json")
    args = ap.parse_args(argv)
    grid = [(v, nd) for v in args.v for nd in args.nd] if args.family == "gaussian" else [(49152, 577)]
    records = []
    for v, nd in grid:
        bmax = max(args.batch)
        inst, hard = build(args.family, v, nd, bmax, seed=v + nd)
        refuse_degenerate(inst.delta, inst.name)
        print(f"\n== {inst.name}: degeneracy min {inst.delta.min():.3f} / median {np.median(inst.delta):.3f}")
        Ws = [jnp.asarray(W, jnp.float32) for W in inst.Ws]
        problem = jaxens.make_problem(Ws, hard=hard)
        A_h = np.concatenate([inst.Ws[i] for i in hard], axis=1)
        M_all = inst.moments()
        cols = np.asarray(problem.columns(hard))
        M = M_all[:, cols]
        mask = np.ones((bmax, inst.c.shape[1]), bool)
        refs = []
        for r in range(min(args.ref_rows, bmax)):
            p, dt, st = highs_lp(A_h, M[r], inst.c[r], time_limit=args.highs_time_limit)
            refs.append(dict(seconds=dt, status=st, objective=None if p is None else float(inst.c[r] @ p)))
            print(f"  HiGHS row {r}: {dt:.1f}s {st} objective {refs[-1]['objective']}")
        highs_s = float(np.mean([x["seconds"] for x in refs]))
        mpax_rows = []
        if args.mpax:
            for r in range(min(args.ref_rows, bmax)):
                p, dt, st = run_mpax(A_h, M[r], inst.c[r])
                res = float(np.abs(A_h.T @ p - M[r]).max())
                rel = (inst.c[r] @ p - refs[r]["objective"]) / abs(refs[r]["objective"]) if refs[r]["objective"] else np.nan
                mpax_rows.append(dict(seconds=dt, status=st, rel_gap=float(rel), residual=res))
                print(f"  MPAX row {r}: {dt:.2f}s status {st} rel gap {rel:.1e} residual {res:.1e}")
        solvers = [("WorkingSet", WorkingSet())] + ([("ADMM", ADMM())] if args.admm else [])
        for b in args.batch:
            for name, solver in solvers:
                sol, dt, comp = run_jaxens(solver, problem, inst.c[:b], M_all[:b], mask[:b])
                P = np.asarray(sol.p, np.float64)
                status = np.asarray(sol.status)
                res = np.abs(np.einsum("bv,vd->bd", P, A_h) - M[:b]).max(1)
                tol_res = 1e-5 * np.maximum(1.0, np.abs(M[:b]).max(1))
                gaps = [
                    (inst.c[r] @ P[r] - refs[r]["objective"]) / abs(refs[r]["objective"])
                    for r in range(min(b, len(refs))) if refs[r]["objective"] is not None
                ]
                matched = [abs(g) <= 1e-4 and res[r] <= tol_res[r] for r, g in enumerate(gaps)]
                ratio = highs_s * b / dt
                rec = dict(
                    family=args.family, name=inst.name, v=int(inst.c.shape[1]), nd=int(A_h.shape[1]), batch=b,
                    solver=name, seconds_per_batch=dt, seconds_per_row=dt / b, compile_seconds=comp,
                    highs_seconds_per_row=highs_s, ratio_vs_highs=ratio,
                    solved=int(np.sum(status == 0)), statuses=np.bincount(status, minlength=5).tolist(),
                    certified_gap_max=float(np.max(np.asarray(sol.gap))), residual_max=float(res.max()),
                    rel_gap_vs_highs=[float(g) for g in gaps], matched_accuracy=bool(all(matched)),
                    iterations=np.asarray(sol.iterations).tolist(),
                    degeneracy_min=float(inst.delta.min()),
                    mpax=mpax_rows, mpax_ratio=(float(np.mean([x["seconds"] for x in mpax_rows])) * b / dt) if mpax_rows else None,
                )
                records.append(rec)
                print(
                    f"  {name:22s} batch {b:3d}: {dt / b:7.3f} s/row  {ratio:7.1f}x HiGHS  "
                    f"SOLVED {rec['solved']}/{b}  cert. gap <= {rec['certified_gap_max']:.1e}  "
                    f"gap vs HiGHS {', '.join(f'{g:.1e}' for g in gaps)}  residual {res.max():.1e}  "
                    f"matched {rec['matched_accuracy']}"
                )
    meta = dict(machine=f"{platform.machine()} {os.cpu_count()} cores", jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), command="python benchmarks/solvers.py " + " ".join(argv or sys.argv[1:]))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    old = []
    if os.path.exists(args.out):
        try:
            old = json.load(open(args.out)).get("runs", [])
        except (ValueError, AttributeError):
            old = []
    json.dump(dict(runs=old + [dict(meta=meta, records=records)]), open(args.out, "w"), indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
