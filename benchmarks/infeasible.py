"""The infeasible real case (issue 15 item 4): all members hard on real rows of SmolLM2-135M +
smollm2-tiny-64 (v = 49,152, D_H = 576 + 64 = 640).  Times the least-squares phase (certificate +
relaxed answer) with Wolfe's minimum-norm point (the default) against FISTA (the earlier
default) in the same run, checks every certificate independently in float64 numpy
(``d^T m_H - max_j (A_H d)_j > 0`` proves the row infeasible), and times the whole default
combiner (``bottleneck(problem, "kl")``, hard = all) on the same rows.

    python benchmarks/infeasible.py --batch 32 --fista-rows 4

Prints a table; writes results/infeasible.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import instances  # noqa: E402

from jaxens import bottleneck, make_problem  # noqa: E402
from jaxens.solvers.least_squares import default_ls_solver, least_squares  # noqa: E402
from jaxens.solvers.min_norm_point import MinNormPoint  # noqa: E402
from jaxens.solvers.solution import Status  # noqa: E402


def timed(fn, *args):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def check_certificates(sol, A_h, m_h):
    """Independent float64 margins of the returned certificates."""
    d = np.asarray(sol.certificate, np.float64)[:, : A_h.shape[1]]
    margins = np.einsum("bd,bd->b", d, m_h) - np.max(d @ A_h.T, axis=1)
    return margins


def run_ls(problem, m, mask, solver):
    # rows mapped one after another (as the combiner does): the loops' lengths differ per row
    f = jax.jit(lambda m, k: jax.lax.map(lambda a: least_squares(problem, a[0], a[1], solver), (m, k)))
    return timed(f, m, mask)


def summarize(name, sol, seconds, rows, A_h, m_h, extra=None):
    status = np.asarray(sol.status)
    inf = status == Status.INFEASIBLE
    margins = check_certificates(sol, A_h, m_h)
    verified = inf & (margins > 0)
    row = dict(
        solver=name, rows=int(rows), seconds=seconds, s_per_row=seconds / rows,
        infeasible=int(inf.sum()), verified=int(verified.sum()),
        solved=int((status == Status.SOLVED).sum()), max_iters=int((status == Status.MAX_ITERS).sum()),
        iterations_mean=float(np.mean(np.asarray(sol.iterations))), iterations_max=int(np.max(np.asarray(sol.iterations))),
        support_mean=float(np.mean(np.sum(np.asarray(sol.p) > 0, axis=1))),
        ls_value_mean=float(np.mean(np.sum((np.asarray(sol.p, np.float64) @ A_h - m_h) ** 2, axis=1))),
    )
    row.update(extra or {})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fista-rows", type=int, default=4, help="rows for the FISTA baseline (slow; 0: skip)")
    ap.add_argument("--no-combiner", action="store_true", help="skip the end-to-end kl combiner timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="results/infeasible.json")
    args = ap.parse_args(argv)

    inst = instances.real_rows(args.batch, seed=args.seed, hard=(0, 1))
    Ws, logits = inst.Ws, inst.logits
    v = Ws[0].shape[0]
    A_h = np.concatenate(Ws, axis=1)
    probs = np.exp(instances.log_softmax(logits))
    m_h = np.concatenate([probs[:, i] @ Ws[i] for i in range(len(Ws))], axis=1)
    print(f"{inst.name}: batch {args.batch}, D_H = {A_h.shape[1]} (hard = all)")
    problem = make_problem(Ws, hard="all", dtype=jnp.float32)
    m = jnp.asarray(m_h, jnp.float32)
    mask = jnp.ones((args.batch, v), bool)

    rows = []
    sol, sec = run_ls(problem, m, mask, MinNormPoint())
    res = summarize("MinNormPoint (default)", sol, sec, args.batch, A_h, m_h,
                    dict(passes_note="iterations = points entered"))
    rows.append(res)
    mnp_p = np.asarray(sol.p, np.float64)
    if args.fista_rows:
        k = min(args.fista_rows, args.batch)
        solf, secf = run_ls(problem, m[:k], mask[:k], default_ls_solver(jnp.float32))
        rows.append(summarize("FISTA (earlier default)", solf, secf, k, A_h, m_h[:k]))
        fp = np.asarray(solf.p, np.float64)
        lsf = np.sum((fp @ A_h - m_h[:k]) ** 2, axis=1)
        lsm = np.sum((mnp_p[:k] @ A_h - m_h[:k]) ** 2, axis=1)
        rows[-1]["ls_value_vs_mnp_rel"] = float(np.max((lsf - lsm) / np.maximum(lsm, 1e-30)))
    if not args.no_combiner:
        comb = bottleneck(problem, "kl", warm_start=False)
        lg = [jnp.asarray(logits[:, i], jnp.float32) for i in range(len(Ws))]
        f = jax.jit(lambda *l: comb.combine(list(l), comb.init(args.batch))[2])
        solc, secc = timed(f, *lg)
        rows.append(summarize("bottleneck kl, hard=all (objective + phase)", solc, secc, args.batch, A_h, m_h))

    print(f"\n| solver | rows | s / row | INFEASIBLE (verified in float64) | SOLVED | MAX_ITERS | points entered mean / max | support | ||A^T p - m||^2 mean |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['solver']} | {r['rows']} | {r['s_per_row']:.3f} | {r['infeasible']} ({r['verified']}) | {r['solved']} | "
              f"{r['max_iters']} | {r['iterations_mean']:.0f} / {r['iterations_max']} | {r['support_mean']:.0f} | {r['ls_value_mean']:.4g} |")
    if len(rows) > 1 and rows[1]["solver"].startswith("FISTA"):
        print(f"\nMinNormPoint vs FISTA throughput: {rows[1]['s_per_row'] / rows[0]['s_per_row']:.1f}x; "
              f"FISTA's least-squares value at most {rows[1]['ls_value_vs_mnp_rel']:.2e} (relative) above MinNormPoint's")
    out = dict(instance=inst.name, batch=args.batch, date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
               cores=len(__import__("os").sched_getaffinity(0)), jax=jax.__version__, rows=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
