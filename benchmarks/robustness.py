"""Robustness of the bottleneck combiner on many random (often nasty) instances.

Every instance is one batch row of one random ensemble.  Ensembles come from a handful of
*shape buckets* (``v, n, d`` and a rank structure fixed per bucket, so each objective compiles
once per bucket and dtype): full-rank Gaussian unembeddings, ``n d >= v`` (the constraints pin
``p`` down or, usually, contradict each other), and rank-deficient / duplicated members.  Rows
mix member logits of several kinds (:data:`KINDS`): random ``W_i h_i`` at several scales,
members that agree exactly (feasible), disjoint supports, random ``-inf`` masks, extreme scales
(``|l| ~ 1e4``), huge common offsets, and NaN / ``+inf`` rows.  Each objective runs through the
:func:`~jaxens.combiners.bottleneck.bottleneck` combiner with its default solver, and every row is
checked against the numerical contract of ``docs/numerics.md`` (:func:`check_rows`):

* ``p`` finite, non-negative, sums to one within ``SUM_TOL[dtype]``, zero on masked tokens;
* ``SOLVED`` => the hard residual, recomputed in float64 from the returned ``p``, is at most
  :func:`residual_tol`; the reported ``primal_residual`` agrees with it;
* ``INFEASIBLE`` => the Farkas margin of the returned certificate, recomputed in float64, is > 0;
* NaN / ``+inf`` logits <=> ``NONFINITE_INPUT``;
* a second identical call gives bit-identical outputs (``--determinism``).

    python benchmarks/robustness.py            # 10,752 instances (7 objectives x 4 buckets x 2 dtypes x 192)
    python benchmarks/robustness.py --quick    # smoke run (a few hundred instances)
    python benchmarks/robustness.py --families # status-contract violations, non-degenerate Gaussian family

Prints a table per objective (instances, NaNs, wrong statuses, status counts, worst residual
per status) and writes ``results/robustness.json``.  Exit code 1 if any contract check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxens import objectives as obj_mod  # noqa: E402
from jaxens.combiners.bottleneck import bottleneck  # noqa: E402
from jaxens.problem import make_problem  # noqa: E402
from jaxens.solvers.solution import Status  # noqa: E402

OBJECTIVES = obj_mod.OBJECTIVES


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A shape bucket: ``n`` members with ``d`` columns each over ``v`` tokens.

    ``structure``: ``"full"`` (Gaussian), ``"degenerate"`` (member 1 duplicates member 0 and
    the last member has rank 2: the rank of ``[A, 1]`` is fixed per bucket so shapes are too).
    """

    v: int
    n: int
    d: int
    structure: str = "full"

    @property
    def name(self) -> str:
        return f"v{self.v}-n{self.n}-d{self.d}-{self.structure}"


BUCKETS = (
    Bucket(32, 2, 4, "full"),  # n d < v: feasible when members agree
    Bucket(24, 3, 8, "full"),  # n d >= v: [A, 1] spans R^v, the set is a point or empty
    Bucket(32, 3, 4, "degenerate"),  # duplicated and rank-deficient members
    Bucket(64, 4, 6, "full"),
)

KINDS = (
    "random",  # l_i = W_i h_i (independent h_i): usually infeasible when all members are hard
    "random_big",  # the same with |l| ~ 30
    "agree",  # every member has the same distribution: always feasible
    "agree_near",  # agree + 1e-3 noise
    "disjoint",  # member i allows only its own block of tokens
    "masked",  # random -inf entries, some tokens masked by every member
    "extreme",  # logits ~ 1e4 * N(0, 1): near one-hot
    "extreme_agree",  # members agree on a ~1e4-scale logit vector
    "offset",  # agree + a common offset of +-1e4 (shift invariance in float32)
    "nan",  # one NaN logit
    "posinf",  # one +inf logit
)

SUM_TOL = {"float32": 1e-5, "float64": 1e-12}
# SOLVED => ||A_H^T p - m_H||_inf <= RES_RTOL * sqrt(v) * max(1, max|A_H|) (see docs/numerics.md).
# Newton solvers tighten their tolerance in float64; the first-order solvers (ADMM, FISTA) have
# dtype-independent defaults (OSQP's 1e-6 / 1e-5; FISTA's relative objective gap 1e-6).
NEWTON_OBJECTIVES = frozenset({"kl", "max_entropy", "cross_entropy"})
RES_RTOL = {"float32": 1e-4, "float64": 1e-7}
FIRST_ORDER_RTOL = 1e-4
LEAST_SQUARES_ATOL = 2e-3  # sqrt(2 * FISTA().tol): SOLVED is an objective-gap statement


# EntropicNewton on the LinearProgram (sum_ce): the gradient tolerance is raised to the round-off floor
# 4 eps |theta|_inf |G|_max with |theta| ~ 1 / eps_min (1e-3 float32, 1e-6 float64).
NEWTON_LP_RTOL = {"float32": 2e-3, "float64": 1e-7}


def residual_tol(objective: str, dtype: str, v: int, A_h: np.ndarray, newton_lp: bool = False) -> float:
    """The documented bound on the hard residual of a ``SOLVED`` row."""
    amax = float(np.max(np.abs(A_h))) if A_h.size else 1.0
    rtol = RES_RTOL[dtype] if objective in NEWTON_OBJECTIVES else FIRST_ORDER_RTOL
    if newton_lp:
        rtol = NEWTON_LP_RTOL[dtype]
    tol = rtol * np.sqrt(v) * max(1.0, amax)
    if objective == "least_squares":
        tol = max(tol, LEAST_SQUARES_ATOL * max(1.0, amax))
    return tol


def make_unembeddings(rng: np.random.Generator, b: Bucket) -> list[np.ndarray]:
    Ws = [rng.normal(size=(b.v, b.d)) for _ in range(b.n)]
    if b.structure == "degenerate":
        Ws[1] = Ws[0].copy()
        Ws[-1] = rng.normal(size=(b.v, 2)) @ rng.normal(size=(2, b.d))
    return Ws


def make_logits(rng: np.random.Generator, Ws: list[np.ndarray], kind: str) -> np.ndarray:
    """Member logits ``(n, v)`` (float64; may hold ``-inf``, NaN, ``+inf``) of one row."""
    n, v = len(Ws), Ws[0].shape[0]
    d = Ws[0].shape[1]
    if kind in ("random", "random_big", "masked", "nan", "posinf", "disjoint"):
        scale = 30.0 if kind == "random_big" else rng.choice([0.3, 1.0, 3.0]) / np.sqrt(d)
        x = np.stack([W @ (scale * rng.normal(size=d)) for W in Ws])
    elif kind in ("agree", "agree_near", "offset"):
        t = rng.choice([0.5, 2.0, 5.0]) * rng.normal(size=v)
        x = np.stack([t + rng.normal() for _ in range(n)])  # shifts do not change softmax
        if kind == "agree_near":
            x = x + 1e-3 * rng.normal(size=x.shape)
        if kind == "offset":
            x = x + rng.choice([-1e4, 1e4])
    elif kind == "extreme":
        x = 1e4 * rng.normal(size=(n, v))
    elif kind == "extreme_agree":
        x = np.tile(1e4 * rng.normal(size=(1, v)), (n, 1))
    else:
        raise ValueError(kind)
    if kind == "masked":
        x = np.where(rng.random(size=x.shape) < 0.3, -np.inf, x)
        x[:, rng.integers(v)] = -np.inf  # masked by every member
        for i in range(n):  # keep at least one token per member
            if np.all(np.isneginf(x[i])):
                x[i, rng.integers(v)] = 0.0
    elif kind == "disjoint":
        block = np.arange(v) * n // v
        x = np.where(block[None, :] == np.arange(n)[:, None], x, -np.inf)
    elif kind == "nan":
        x[rng.integers(n), rng.integers(v)] = np.nan
    elif kind == "posinf":
        x[rng.integers(n), rng.integers(v)] = np.inf
    return x


# --------------------------------------------------------------------------------------------
# running a batch through the combiner (problem is a jit argument: one compile per bucket)
# --------------------------------------------------------------------------------------------
_RUNNERS: dict[Any, Any] = {}


def runner(objective: str, solver: Any = None):
    """``f(problem, logits (B, n, v)) -> (logp, Solution)``, jitted once per objective/solver."""
    key = (objective, solver)
    if key not in _RUNNERS:

        def run(problem, x):
            comb = bottleneck(problem, objective, solver=solver, warm_start=False)
            logp, _, sol = comb.combine([x[:, i] for i in range(x.shape[1])], None)
            return logp, sol

        _RUNNERS[key] = jax.jit(run)
    return _RUNNERS[key]


def row_mask(objective: str, logits: np.ndarray) -> np.ndarray:
    """The objective's allowed tokens (uniform weights), as :func:`jaxens.objectives.row_data`."""
    ruled_out = np.isneginf(logits)
    loose = ~np.all(ruled_out, axis=0)
    if objective in obj_mod.STRICT_MASK:
        strict = ~np.any(ruled_out, axis=0)
        return strict if strict.any() else loose
    return loose


def _log_softmax(x: np.ndarray) -> np.ndarray:
    mx = np.max(x, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return x - mx - np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))


def check_rows(
    objective: str,
    dtype: str,
    Ws: list[np.ndarray],
    logits: np.ndarray,
    p: np.ndarray,
    sol: dict[str, np.ndarray],
    newton_lp: bool = False,
) -> list[dict[str, Any]]:
    """Check every row against the contract; returns one record per row (with ``errors``)."""
    A = np.concatenate(Ws, axis=1)  # all members hard in these runs
    v = A.shape[0]
    rtol = residual_tol(objective, dtype, v, A, newton_lp)
    out = []
    for b in range(logits.shape[0]):
        x = logits[b]
        errs = []
        status = int(sol["status"][b])
        pb = p[b].astype(np.float64)
        nonfinite = bool(np.any(np.isnan(x) | (x == np.inf)))
        rec: dict[str, Any] = dict(status=status, residual=np.nan, margin=np.nan)
        if not np.all(np.isfinite(pb)):
            errs.append("nan")
            out.append(dict(rec, errors=errs))
            continue
        if pb.min() < 0:
            errs.append(f"negative p ({pb.min():.3g})")
        if abs(pb.sum() - 1.0) > SUM_TOL[dtype]:
            errs.append(f"sum(p) - 1 = {pb.sum() - 1:.3g}")
        if status not in set(int(s) for s in Status):
            errs.append(f"unknown status {status}")
        if nonfinite != (status == Status.NONFINITE_INPUT):
            errs.append(f"nonfinite input {nonfinite} but status {status}")
        xs = np.where(np.isnan(x) | (x == np.inf), 0.0, x)
        mask = row_mask(objective, xs)
        if np.any(pb[~mask] != 0):
            errs.append(f"mass {pb[~mask].sum():.3g} on masked tokens")
        if not nonfinite:
            q = np.exp(_log_softmax(xs))
            m = np.einsum("nv,vnd->nd", q, np.stack(Ws, axis=1)).reshape(-1)
            res = float(np.max(np.abs(A.T @ pb - m)))
            rec["residual"] = res
            if status == Status.SOLVED and res > rtol:
                errs.append(f"SOLVED but residual {res:.3g} > {rtol:.3g}")
            if status == Status.SOLVED and abs(res - float(sol["primal_residual"][b])) > rtol:
                errs.append(f"reported residual {float(sol['primal_residual'][b]):.3g} vs {res:.3g}")
            if status == Status.INFEASIBLE:
                dvec = sol["certificate"][b].astype(np.float64)
                margin = float(dvec @ m - np.max(np.where(mask, A @ dvec, -np.inf)))
                rec["margin"] = margin
                if not margin > 0:
                    errs.append(f"INFEASIBLE but float64 margin {margin:.3g} <= 0")
        out.append(dict(rec, errors=errs))
    return out


def solve_batch(objective: str, dtype: str, Ws, logits: np.ndarray, solver=None, logits_dtype=None):
    """Run one batch; returns ``(p, solution dict)`` as float64/int numpy arrays."""
    jdt = jnp.float64 if dtype == "float64" else jnp.float32
    P = make_problem(Ws, dtype=jdt)
    x = jnp.asarray(logits, logits_dtype or jdt)
    logp, sol = runner(objective, solver)(P, x)
    p = np.exp(np.asarray(logp, np.float64))
    return p, {k: np.asarray(getattr(sol, k)) for k in sol._fields}


def highs_l1_distance(Ws: list[np.ndarray], logits: np.ndarray, objective: str) -> float:
    """``min ||A^T p - m||_1`` over the masked simplex (HiGHS); 0 iff the row is feasible."""
    from scipy.optimize import linprog

    A = np.concatenate(Ws, axis=1)
    v, D = A.shape
    mask = row_mask(objective, logits)
    q = np.exp(_log_softmax(logits))
    m = np.einsum("nv,vnd->nd", q, np.stack(Ws, axis=1)).reshape(-1)
    # variables (p, s+, s-): A^T p - s+ + s- = m, 1^T p = 1
    cost = np.concatenate([np.zeros(v), np.ones(2 * D)])
    A_eq = np.block([[A.T, -np.eye(D), np.eye(D)], [np.ones((1, v)), np.zeros((1, 2 * D))]])
    b_eq = np.concatenate([m, [1.0]])
    bounds = [(0, None if mk else 0) for mk in mask] + [(0, None)] * (2 * D)
    res = linprog(cost, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 buckets, 1 batch of 32 each")
    ap.add_argument("--batch", type=int, default=192, help="rows per combiner call")
    ap.add_argument("--batches", type=int, default=None, help="batches per (objective, bucket, dtype)")
    ap.add_argument("--objectives", nargs="*", default=list(OBJECTIVES))
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    ap.add_argument("--determinism", action="store_true", help="solve every batch twice and compare bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/robustness.json")
    ap.add_argument("--families", action="store_true",
                    help="status-contract violations on the non-degenerate Gaussian family (status_contract.py)")
    ap.add_argument("--family-v", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--family-rows", type=int, default=4)
    ap.add_argument("--family-n", type=int, default=2)
    ap.add_argument("--family-d", type=int, default=16)
    args = ap.parse_args(argv)
    if args.families:
        return families_main(args)
    buckets = BUCKETS[:2] if args.quick else BUCKETS
    if args.quick:
        args.batch = min(args.batch, 32)
    nbatches = args.batches if args.batches is not None else (1 if args.quick else 1)
    if "float64" in args.dtypes:
        jax.config.update("jax_enable_x64", True)

    rng = np.random.default_rng(args.seed)
    stats: dict[str, Any] = {}
    failures = []
    t_start = time.perf_counter()
    for objective in args.objectives:
        st = dict(instances=0, nan=0, wrong_status=0, status=Counter(), worst_residual=defaultdict(float),
                  min_margin=np.inf, nondeterministic=0, seconds=0.0)
        for dtype in args.dtypes:
            for bucket in buckets:
                for _ in range(nbatches):
                    Ws = make_unembeddings(rng, bucket)
                    kinds = [KINDS[i % len(KINDS)] for i in range(args.batch)]
                    logits = np.stack([make_logits(rng, Ws, k) for k in kinds])
                    t0 = time.perf_counter()
                    p, sol = solve_batch(objective, dtype, Ws, logits)
                    if args.determinism:
                        p2, sol2 = solve_batch(objective, dtype, Ws, logits)
                        same = np.array_equal(p, p2, equal_nan=True) and all(
                            np.array_equal(sol[k], sol2[k], equal_nan=True) for k in sol
                        )
                        st["nondeterministic"] += int(not same)
                    st["seconds"] += time.perf_counter() - t0
                    recs = check_rows(objective, dtype, Ws, logits, p, sol)
                    for kind, r in zip(kinds, recs):
                        st["instances"] += 1
                        name = Status(r["status"]).name if r["status"] in set(int(s) for s in Status) else str(r["status"])
                        st["status"][name] += 1
                        if "nan" in r["errors"]:
                            st["nan"] += 1
                        elif r["errors"]:
                            st["wrong_status"] += 1
                        if np.isfinite(r["residual"]):
                            key = f"{dtype}:{name}"
                            st["worst_residual"][key] = max(st["worst_residual"][key], r["residual"])
                        if np.isfinite(r["margin"]):
                            st["min_margin"] = min(st["min_margin"], r["margin"])
                        if r["errors"] and len(failures) < 200:
                            failures.append(dict(objective=objective, dtype=dtype, bucket=bucket.name, kind=kind,
                                                 status=name, errors=r["errors"]))
        stats[objective] = st
        print(
            f"{objective:20s} n={st['instances']:6d} nan={st['nan']} wrong={st['wrong_status']} "
            f"nondet={st['nondeterministic']} {dict(st['status'])} "
            f"worst_res={ {k: float(f'{x:.3g}') for k, x in st['worst_residual'].items()} } "
            f"min_margin={st['min_margin']:.3g} ({st['seconds']:.1f}s)",
            flush=True,
        )
    total = sum(s["instances"] for s in stats.values())
    bad = sum(s["nan"] + s["wrong_status"] + s["nondeterministic"] for s in stats.values())
    print(f"total instances {total}, failing {bad}, {time.perf_counter() - t_start:.0f}s")
    for f in failures[:20]:
        print("  FAIL", f)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            dict(
                buckets=[b.name for b in buckets],
                batch=args.batch,
                dtypes=args.dtypes,
                jax=jax.__version__,
                objectives={
                    k: dict(s, status=dict(s["status"]), worst_residual=dict(s["worst_residual"]),
                            min_margin=None if not np.isfinite(s["min_margin"]) else s["min_margin"])
                    for k, s in stats.items()
                },
                failures=failures,
            ),
            fh,
            indent=1,
        )
    return 1 if bad else 0


def families_main(args) -> int:
    """``--families``: the status-contract counts per objective and family, merged into ``--out``."""
    from status_contract import VIOLATIONS, run_families

    dtypes = args.dtypes
    if "float64" in dtypes:
        jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    rows = run_families(args.objectives, dtypes, args.family_v, args.family_rows, args.family_n, args.family_d,
                        args.seed, solve_batch, residual_tol, Status)
    total = sum(sum(r["violations"].values()) for r in rows)
    print(f"status-contract violations on the non-degenerate families: {total} "
          f"({sum(r['rows'] for r in rows)} rows, {time.perf_counter() - t0:.0f}s)")
    print("| family | dtype | objective | rows | " + " | ".join(VIOLATIONS) + " | INFEASIBLE on feasible | statuses |")
    for r in rows:
        print(f"| {r['family']} | {r['dtype']} | `{r['objective']}` | {r['rows']} | "
              + " | ".join(str(r["violations"][k]) for k in VIOLATIONS)
              + f" | {r['infeasible_on_feasible']} | {r['status']} |")
    data = {}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            data = json.load(fh)
    # runs accumulate: a row replaces the earlier one of the same (family, dtype, objective)
    command = " ".join(["python"] + sys.argv)
    for r in rows:
        r["command"] = command
    prev = data.get("status_contract", {}).get("rows", [])
    keys = {(r["family"], r["dtype"], r["objective"]) for r in rows}
    merged = [r for r in prev if (r["family"], r["dtype"], r["objective"]) not in keys] + rows
    data["status_contract"] = dict(jax=jax.__version__, rows=merged,
                                   total_violations=sum(sum(r["violations"].values()) for r in merged))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1, default=float)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
