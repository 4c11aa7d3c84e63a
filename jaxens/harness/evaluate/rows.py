r"""The rows of the evaluation table: single members, uniform averages, ME, and the bottleneck
objectives under each constraint set, with the solver each objective runs.

Constraint sets: ``all`` (every member hard), ``best`` (the member with the lowest validation
NLL hard), ``soft`` (every member soft with strength ``rho``).  Each bottleneck row also appears
smoothed, :math:`(1-\lambda)p^\star + \lambda\,\mathrm{softmax}(\sum_i w_i \log\hat p_i)`, with
:math:`\lambda` the grid value of lowest validation NLL (no new solve: :math:`p^\star` does not
depend on :math:`\lambda`).  ME's per-step distribution is exactly the probability average's,
so its row repeats that row's metrics at ME's cost (one member per step).

Solvers (:func:`solver_for`): the objective's default solver
(:func:`jaxens.solvers.default_solver`) with ``hessian_topk`` for ``kl`` /
``max_entropy`` and ``max_iters`` for the defaults with an iteration cap (ADMM) when the configuration sets them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.bottleneck import bottleneck
from jaxens.solvers.admm import ADMM
from jaxens.solvers.defaults import default_solver
from jaxens.harness.evaluate.combine import feasibility_rows, jit_combiner, run_combiner, run_feasible_rows
from jaxens.harness.evaluate.config import EvalConfig
from jaxens.harness.evaluate.metrics import METRICS, row_scores, smooth_logp, smooth_target_logp, summarize
from jaxens.harness.reports import progress_bar
from jaxens.problem import make_problem

ENTROPIC_OBJECTIVES = ("kl", "max_entropy")  # EntropicNewton: hessian_topk


def solver_for(objective: str, cfg: EvalConfig):
    """The objective's default solver with the configuration's ``hessian_topk`` (entropic
    objectives) or ``max_iters`` (where the default is ADMM; WorkingSet, RatioIPM and the
    Newton solvers keep their own caps) when set."""
    overrides = {}
    if objective in ENTROPIC_OBJECTIVES and cfg.hessian_topk is not None:
        overrides["hessian_topk"] = cfg.hessian_topk
    elif isinstance(default_solver(objective), ADMM) and cfg.max_iters is not None:
        overrides["max_iters"] = cfg.max_iters
    return default_solver(objective, **overrides)


def least_squares_solver(cfg: EvalConfig):
    """The least-squares phase's solver: ``None``, its default (Wolfe's minimum-norm point, with
    its own pass cap; ``cfg.max_iters`` caps the iterative objective solvers only)."""
    return None


def unembeddings(members, v):
    """``(W_i, b_i)`` of every member, float64, cut to the first ``v`` rows."""
    Ws, bs = [], []
    for i, m in enumerate(members):
        W, b = m.unembedding()
        if W.shape[0] < v:
            raise ValueError(f"member {i} unembedding {W.shape} has fewer than vocab_size={v} rows")
        Ws.append(np.asarray(W, np.float64)[:v])
        bs.append(None if b is None else np.asarray(b, np.float64)[:v])
    return Ws, bs


def make_row(name, kind, summary, *, tok_s, infeasible=None, iters=None, lam=None, note="", params=None,
         not_converged=None) -> dict:
    """One table row: the combiner's name and kind, its metrics (:func:`summarize`) and solver columns."""
    r = {"combiner": name, "kind": kind, **summary, "infeasible": infeasible, "iters": iters,
         "not_converged": not_converged, "lam": lam, "tok_s": tok_s, "note": note}
    if params is not None:
        r["params"] = params
    return r


def member_rows(val, test, names, member_s) -> tuple[list[dict], list[float]]:
    """One row per member and the members' validation NLLs."""
    rows, val_nll = [], []
    for i in range(len(names)):
        lp_val = jax.nn.log_softmax(jnp.asarray(val.logits[i]), axis=-1)
        val_nll.append(summarize(row_scores(lp_val, val.targets))["nll"])
        lp = np.asarray(jax.nn.log_softmax(jnp.asarray(test.logits[i]), axis=-1))
        rows.append(make_row(f"member {names[i]}", "member", summarize(row_scores(lp, test.targets)),
                             tok_s=tok_s(member_s[i], 0.0)))
        rows[-1]["val_nll"] = val_nll[-1]
    return rows, val_nll


def tok_s(used_cost: float, per_row: float) -> float:
    """Tokens per second at member cost ``used_cost`` and combine cost ``per_row`` (seconds per token)."""
    return float(1.0 / (used_cost + per_row))


def me_row(name: str, like: dict, cost: float, note: str, params=None) -> dict:
    """ME's row: the metrics of the probability-average row ``like`` at ME's cost ``cost``."""
    return make_row(name, "me", {k: v_ for k, v_ in like.items() if k in METRICS + ("_lt",)},
                    tok_s=tok_s(cost, 0.0), params=params, note=note)


def average_rows(test, batch_rows, all_cost, member_s) -> list[dict]:
    """The uniform logit and probability averages, and ME (uniform)."""
    rows = []
    for label, comb in (("logit_average", logit_average()), ("prob_average", prob_average())):
        run = run_combiner(comb, test.logits, batch_rows)
        rows.append(make_row(label, "average", summarize(row_scores(run.logp, test.targets)),
                             tok_s=tok_s(all_cost, run.seconds_per_row), note="uniform weights"))
    rows.append(me_row("me", rows[-1], float(np.mean(member_s)),
                       "exact per-step distribution = prob_average (uniform); one member per step"))
    return rows


def bottleneck_rows(members, v, val, test, cfg: EvalConfig, best, names, all_cost, log, store=None) -> list[dict]:
    """Every objective of ``cfg.objectives`` under every constraint set of ``cfg.constraints``, each
    row also smoothed towards the uniform logit average with ``lambda`` chosen on validation.
    ``store`` (:class:`~jaxens.harness.evaluate.store.RowStore`): finished rows are taken from it
    and new ones recorded as each finishes."""
    n = len(members)
    Ws, bs = unembeddings(members, v)
    sets = {
        "all": dict(hard="all", soft=None, rho=None, label="hard=all"),
        "best": dict(hard=(best,), soft=None, rho=None, label=f"hard={names[best]}"),
        "soft": dict(hard=(), soft=tuple(range(n)), rho=cfg.rho, label=f"soft rho={cfg.rho:g}"),
    }
    # the smoothing target: the uniform logit average (bottleneck's lam uses the same weights)
    lq_val = row_scores(np.asarray(jax.nn.log_softmax(
        jnp.mean(jax.nn.log_softmax(jnp.asarray(val.logits), -1), 0), -1)), val.targets).logp_target
    lq_test_full = np.asarray(jax.nn.log_softmax(
        jnp.mean(jax.nn.log_softmax(jnp.asarray(test.logits), -1), 0), -1))
    rows = []
    jobs = [(c, o) for c in cfg.constraints for o in cfg.objectives]
    bar = progress_bar(total=len(jobs), desc="bottleneck combiners", disable=not cfg.progress)
    for cset in cfg.constraints:
        s = sets[cset]
        todo = []
        for objective in cfg.objectives:
            name = f"bn:{objective} [{s['label']}]"
            done = [store.get(x) for x in (name, f"{name} +smooth")] if store is not None else [None]
            if all(r is not None for r in done) or (done[0] is not None and "nll" not in done[0]):
                rows += [r for r in done if r is not None]  # finished (or skipped) in an earlier run
                bar.update(1)
            else:
                todo.append(objective)
        if not todo:
            continue
        problem = make_problem(Ws, bs, hard=s["hard"], soft=s["soft"], dtype=jnp.float32)
        feas = None
        if s["hard"] == "all" and n > 1:
            # one hard member is always feasible (its own p_i); several may not be: decide once
            t_start = time.perf_counter()
            feas = {split: feasibility_rows(problem, data.logits, cfg.batch_rows, least_squares_solver(cfg),
                                            progress=cfg.progress)
                    for split, data in (("val", val), ("test", test))}
            ls_s = (time.perf_counter() - t_start) / (val.logits.shape[1] + test.logits.shape[1])
            log(f"hard=all least-squares phase: {time.perf_counter() - t_start:.1f}s, infeasible "
                f"{np.mean(feas['test'][0] == 2):.2f} of test rows")
        for objective in todo:
            name = f"bn:{objective} [{s['label']}]"
            bar.set_postfix_str(name)
            put = store.put if store is not None else (lambda r: r)
            try:
                # The combiner's own least-squares phase is never needed here: with several hard
                # members the verdict was decided above; one hard member is always feasible (its
                # own distribution is a witness), so the phase could only confirm it (and would
                # run to its cap on every row where the objective's solver did).
                comb = bottleneck(problem, objective, rho=s["rho"], solver=solver_for(objective, cfg),
                                  check_feasibility=False)
                fn = jit_combiner(comb)
                t_start = time.perf_counter()
                pg = dict(progress=cfg.progress)
                if feas is None:
                    rv = run_combiner(comb, val.logits, cfg.batch_rows, fn=fn, desc=f"{name} validation", **pg)
                    rt = run_combiner(comb, test.logits, cfg.batch_rows, fn=fn, desc=f"{name} test", **pg)
                else:
                    rv = run_feasible_rows(comb, val.logits, cfg.batch_rows, fn, *feas["val"], ls_s,
                                           desc=f"{name} validation", **pg)
                    rt = run_feasible_rows(comb, test.logits, cfg.batch_rows, fn, *feas["test"], ls_s,
                                           desc=f"{name} test", **pg)
                log(f"{name}: {time.perf_counter() - t_start:.1f}s (compile {rv.compile_seconds:.1f}s, "
                    f"{rt.seconds_per_row:.3f}s/row, infeasible {np.mean(rt.status == 2):.2f})")
            except (ValueError, TypeError, NotImplementedError) as e:  # objective/solver does not support the set
                rows.append(put(make_row(name, "bottleneck", {}, tok_s=None, note=f"skipped: {e}")))
                log(f"{name}: skipped ({e})")
                bar.update(1)
                continue
            summary = summarize(row_scores(rt.logp, test.targets))
            stats = dict(infeasible=float(np.mean(rt.status == 2)), iters=float(np.mean(rt.iterations)),
                         not_converged=float(np.mean(rt.status == 1)))
            speed = 1.0 / (all_cost + rt.seconds_per_row)
            rows.append(make_row(name, "bottleneck", summary, tok_s=speed, **stats))
            rows[-1]["compile_s"] = rv.compile_seconds
            put(rows[-1])
            # lambda on validation (NLL of the observed token only: no new solve)
            lt_val = row_scores(rv.logp, val.targets).logp_target
            nlls = [float(-np.mean(smooth_target_logp(lt_val, lq_val, lam))) for lam in cfg.lambda_grid]
            k = int(np.argmin(nlls))
            lam = cfg.lambda_grid[k]
            sm = smooth_logp(rt.logp, lq_test_full, lam)
            rows.append(put(make_row(f"{name} +smooth", "bottleneck+smooth", summarize(row_scores(sm, test.targets)),
                                     tok_s=speed, lam=lam, **stats,
                                     note=f"lambda from validation (val NLL {nlls[k]:.3f})")))
            bar.update(1)
    bar.close()
    order = [f"bn:{o} [{sets[c]['label']}]{x}" for c in cfg.constraints for o in cfg.objectives for x in ("", " +smooth")]
    return sorted(rows, key=lambda r: order.index(r["combiner"]) if r["combiner"] in order else len(order))
