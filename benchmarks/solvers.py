"""Bottleneck LP (``sum_ce``) solvers: jaxens vs HiGHS vs OSQP vs jaxopt BoxOSQP vs cvxpy.

Every solver gets the identical instance per row:

    min_p  c.p   s.t.  A^T p = m,  sum(p) = 1,  p >= 0,

with ``A = [W_1 | ... | W_n]`` (``v x n*d``, Gaussian unembeddings scaled like a trained LM's),
member logits ``l_i = W_i h_i`` (std ~3), ``c = -mean_i log softmax(l_i)`` and ``m = A^T p*``
for a "true" distribution ``p*`` (so every instance is feasible).  jaxens rows are solved as a
batch (vmapped, jit-compiled, timed after one warm-up call); the CPU references solve one row at
a time, so their per-row time does not depend on the batch.  Reported per configuration:
time per row, throughput ratio vs HiGHS, relative objective gap vs HiGHS's optimum and
``||A^T p - m||_inf``.

    python benchmarks/solvers.py                 # default grid (a few minutes on 2 CPU cores)
    python benchmarks/solvers.py --full          # v in {8192,16384,49152}, nd in {128,256,1152}, B in {1,8,32}
    python benchmarks/solvers.py --v 16384 --nd 256 --batch 8

Writes ``results/solvers.json``.  CPU timings here are from a 2-core machine; GPU figures, when
measured, say so.
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
from jaxens.solvers.entropic_newton import EntropicNewton  # noqa: E402
from jaxens.solvers.instances import LinearProgram  # noqa: E402
from references import cvxpy_lp, highs_lp, jaxopt_boxosqp_lp, osqp_lp  # noqa: E402


def _lse(x):
    mx = x.max(-1, keepdims=True)
    return mx + np.log(np.exp(x - mx).sum(-1, keepdims=True))


def make_instance(v: int, nd: int, batch: int, seed: int = 0):
    """Shared ``A`` and per-row ``(c, m)``; feasible by construction."""
    rng = np.random.default_rng(seed)
    d = 64 if nd <= 256 else 384 if nd % 384 == 0 else 576
    n = max(1, nd // d)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    A = np.concatenate(Ws, axis=1)
    cs, ms = [], []
    for _ in range(batch):
        logits = np.stack([W @ (3.0 * rng.normal(size=d)) for W in Ws])
        logp = logits - _lse(logits)
        true = logits.mean(0) + rng.normal(size=v)
        pstar = np.exp(true - _lse(true))
        cs.append(-logp.mean(0))
        ms.append(A.T @ pstar)
    return A, np.stack(cs), np.stack(ms), n, d


def run_jaxens(solver, problem, c, m, method: str):
    c = jnp.asarray(c, problem.A.dtype)
    m = jnp.asarray(m, problem.A.dtype)
    mask = jnp.ones(c.shape, bool)
    rho = jnp.zeros((problem.num_members,), problem.A.dtype)
    # the problem is an argument, not a closure: no v x D constants in the executable
    # one LinearProgram for both solvers (ADMM; EntropicNewton by entropic continuation)
    row = lambda P, ci, mi: solver.solve(P, LinearProgram(ci, mask[0], mi, rho))[0]  # noqa: E731
    fn = jax.jit(jax.vmap(row, in_axes=(None, 0, 0)))
    sol = fn(problem, c, m)
    jax.block_until_ready(sol)
    t0 = time.perf_counter()
    sol = fn(problem, c, m)
    jax.block_until_ready(sol)
    return sol, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v", type=int, nargs="*", default=[8192, 16384])
    ap.add_argument("--nd", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--full", action="store_true", help="the whole grid of the issue (long: HiGHS takes minutes per row)")
    ap.add_argument("--ref-rows", type=int, default=1, help="rows solved by each CPU reference per config")
    ap.add_argument("--no-osqp", action="store_true")
    ap.add_argument("--no-jaxopt", action="store_true")
    ap.add_argument("--cvxpy", action="store_true", help="also time cvxpy (default solver)")
    ap.add_argument("--eps-min", type=float, default=None, help="last entropy weight of the continuation (relative; default per dtype)")
    ap.add_argument("--topk", type=int, default=2048, help="Newton Hessian over the top-k tokens by mass")
    ap.add_argument("--highs-time-limit", type=float, default=1800.0,
                    help="seconds per HiGHS row; a row that hits it makes every ratio a lower bound (printed as >=)")
    ap.add_argument("--solvers", default="newton,admm", help="jaxens solvers to time (comma-separated: newton, admm)")
    ap.add_argument("--out", default="results/solvers.json")
    args = ap.parse_args(argv)
    if args.full:
        args.v, args.nd, args.batch = [8192, 16384, 49152], [128, 256, 1152], [1, 8, 32]

    jaxens_solvers = {
        "jaxens-newton": ("newton", EntropicNewton(eps_min=args.eps_min, max_iters=60, hessian_topk=args.topk)),
        "jaxens-admm": ("admm", ADMM()),
    }
    wanted = {f"jaxens-{s.strip()}" for s in args.solvers.split(",") if s.strip()}
    if not wanted or not wanted <= set(jaxens_solvers):
        ap.error(f"--solvers must name some of newton, admm; got {args.solvers!r}")
    jaxens_solvers = {k: v for k, v in jaxens_solvers.items() if k in wanted}
    rows = []
    for v in args.v:
        for nd in args.nd:
            bmax = max(args.batch)
            A, C, M, n, d = make_instance(v, nd, bmax, seed=v + nd)
            problem = jaxens.make_problem([A[:, i * d : (i + 1) * d] for i in range(n)])
            refs = {}
            k = min(args.ref_rows, bmax)
            for name, fn in (
                ("highs", highs_lp),
                ("osqp", None if args.no_osqp else osqp_lp),
                ("jaxopt-boxosqp", None if args.no_jaxopt else jaxopt_boxosqp_lp),
                ("cvxpy", cvxpy_lp if args.cvxpy else None),
            ):
                if fn is None:
                    continue
                ts, objs, res = [], [], []
                for r in range(k):
                    if name == "highs":
                        p, dt, st = fn(A, M[r], C[r], time_limit=args.highs_time_limit)
                    else:
                        p, dt, st = fn(A, M[r], C[r])
                    ts.append(dt)
                    objs.append(np.nan if p is None else float(C[r] @ p))
                    res.append(np.nan if p is None else float(np.abs(A.T @ p - M[r]).max()))
                refs[name] = dict(sec_per_row=float(np.mean(ts)), obj=objs, residual=float(np.nanmax(res)), status=st)
                print(f"  [v={v} nd={nd}] {name}: {np.mean(ts):.3f} s/row ({st})", flush=True)
            # If HiGHS hit its time limit, its time is a lower bound (ratios are ">=") and the
            # optimum comes from the first other reference that solved the row.
            highs_timed_out = refs["highs"]["status"] != "Optimal"
            opt = np.asarray(refs["highs"]["obj"])
            ref_name = "highs"
            if highs_timed_out:
                for rname, ref in refs.items():
                    if rname != "highs" and np.all(np.isfinite(ref["obj"])):
                        opt, ref_name = np.asarray(ref["obj"]), rname
                        break
            for b in args.batch:
                for name, (method, solver) in jaxens_solvers.items():
                    sol, dt = run_jaxens(solver, problem, C[:b], M[:b], method)
                    p = np.asarray(sol.p, np.float64)
                    kk = min(k, b)
                    obj = np.einsum("bv,bv->b", C[:kk], p[:kk])
                    gap = float(np.max(np.abs(obj - opt[:kk]) / np.abs(opt[:kk])))
                    resid = float(np.max(np.abs(p @ A - M[:b])))
                    row = dict(
                        v=v, nd=nd, n=n, d=d, batch=b, solver=name, sec_per_row=dt / b,
                        speedup_vs_highs=refs["highs"]["sec_per_row"] / (dt / b),
                        rel_gap_vs_highs=gap, residual=resid,
                        iterations=float(np.mean(np.asarray(sol.iterations))),
                        highs_timed_out=highs_timed_out, gap_reference=ref_name,
                        statuses=np.bincount(np.asarray(sol.status), minlength=5).tolist(),
                    )
                    rows.append(row)
                    print(
                        f"v={v:6d} nd={nd:5d} B={b:3d} {name:14s} {dt / b * 1e3:9.2f} ms/row  "
                        f"{'>=' if highs_timed_out else 'x '}{row['speedup_vs_highs']:8.1f} vs HiGHS  gap {gap:.1e}  resid {resid:.1e}  "
                        f"iters {row['iterations']:.0f}",
                        flush=True,
                    )
                for rname, ref in refs.items():
                    if rname == "highs":
                        continue
                    rows.append(dict(
                        v=v, nd=nd, n=n, d=d, batch=b, solver=rname, sec_per_row=ref["sec_per_row"],
                        speedup_vs_highs=refs["highs"]["sec_per_row"] / ref["sec_per_row"],
                        rel_gap_vs_highs=float(np.nanmax(np.abs(np.asarray(ref["obj"]) - opt) / np.abs(opt))),
                        residual=ref["residual"], status=ref["status"], highs_timed_out=highs_timed_out,
                        gap_reference=ref_name,
                    ))
                rows.append(dict(v=v, nd=nd, n=n, d=d, batch=b, solver="highs", sec_per_row=refs["highs"]["sec_per_row"],
                                 speedup_vs_highs=1.0, rel_gap_vs_highs=0.0, residual=refs["highs"]["residual"],
                                 status=refs["highs"]["status"], highs_timed_out=highs_timed_out))

    print("\n| v | n·d | batch | solver | ms/row | × HiGHS throughput | rel. gap | residual |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ge = ">= " if r.get("highs_timed_out") else ""
        print(f"| {r['v']} | {r['nd']} | {r['batch']} | {r['solver']} | {r['sec_per_row'] * 1e3:.1f} | "
              f"{ge}{r['speedup_vs_highs']:.1f} | {r['rel_gap_vs_highs']:.1e} | {r['residual']:.1e} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.platform(), cpus=os.cpu_count(),
                backend=jax.default_backend(), device=str(jax.devices()[0]), jax=jax.__version__)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
