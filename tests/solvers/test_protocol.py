"""The solver protocol: typed instances, the TypeError for a wrong one, the driver and the table."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.objectives import OBJECTIVES, instance, row_data
from jaxens.problem import make_problem
from jaxens.solvers.adjoint import ImplicitAdjoint, UnrolledAdjoint
from jaxens.solvers.admm import ADMM
from jaxens.solvers.base import AbstractIterativeSolver, iterate
from jaxens.solvers.cross_entropy_newton import CrossEntropyNewton
from jaxens.solvers.defaults import default_solver
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.fista import FISTA
from jaxens.solvers.instances import ACCEPTED_BY, EntropicProgram, LeastSquaresProgram, RatioProgram
from jaxens.solvers.least_squares import LeastSquares
from jaxens.solvers.ratio_ipm import RatioIPM
from jaxens.solvers.solution import Status
from jaxens.solvers.working_set import WorkingSet


def _problem():
    rng = np.random.default_rng(0)
    Ws = [rng.normal(size=(30, 3)) for _ in range(2)]
    return make_problem(Ws, hard=(0,)), rng


@pytest.mark.no_typecheck  # jaxens's own message, not the runtime type checker's
def test_wrong_instance_names_the_accepting_solvers():
    problem, _ = _problem()
    inst = EntropicProgram(jnp.zeros(30), jnp.ones(30, bool), jnp.zeros(problem.A.shape[1]))
    with pytest.raises(TypeError, match=r"ADMM does not accept EntropicProgram .*EntropicProgram is accepted by EntropicNewton"):
        ADMM().solve(problem, inst)
    with pytest.raises(TypeError, match="accepted by LeastSquares"):
        FISTA().solve(problem, LeastSquaresProgram(jnp.ones(30, bool), jnp.zeros(problem.A.shape[1])))


def test_every_objective_builds_an_instance_its_default_solver_accepts():
    problem, rng = _problem()
    logits = jnp.asarray(rng.normal(size=(2, 30)))
    w = jnp.ones(2) / 2
    for objective in OBJECTIVES:
        d = row_data(objective, logits, w)
        m = problem.moments(jnp.exp(d.logp))
        inst = instance(objective, d, m, jnp.zeros(2))
        solver = default_solver(objective)
        assert isinstance(inst, solver.accepts), objective
        assert type(solver).__name__ in ACCEPTED_BY[type(inst)]


def test_default_solver_table_and_overrides():
    assert default_solver("kl") == EntropicNewton()
    assert default_solver("cross_entropy") == CrossEntropyNewton()
    assert default_solver("sum_ce") == WorkingSet() == default_solver("sum_sq_ce")
    assert default_solver("min_underestimation") == RatioIPM()
    assert default_solver("min_underestimation", max_iters=7).max_iters == 7
    assert default_solver("sum_ce", max_rounds=3).max_rounds == 3
    assert default_solver("least_squares") == LeastSquares() and LeastSquares().fista is None
    assert default_solver("kl", hessian_topk=64).hessian_topk == 64
    assert default_solver("least_squares", max_iters=7).fista.max_iters == 7
    with pytest.raises(ValueError, match="unknown bottleneck objective"):
        default_solver("nope")


def test_adjoint_objects():
    assert UnrolledAdjoint().num_steps(500) == 500 and UnrolledAdjoint(steps=3).num_steps(500) == 3
    with pytest.raises(ValueError, match="steps >= 1"):
        UnrolledAdjoint(steps=0)
    with pytest.raises(TypeError, match="ImplicitAdjoint"):
        FISTA(adjoint="unrolled")
    assert dataclasses.replace(ADMM(), adjoint=UnrolledAdjoint(10)).adjoint != ImplicitAdjoint()


@dataclasses.dataclass(frozen=True)
class _Halving(AbstractIterativeSolver):
    """x <- x / 2 until x <= tol (a toy solver for the driver)."""

    tol: float = 1e-3

    def solve(self, problem, instance, warm=None):  # pragma: no cover - not used
        raise NotImplementedError

    def step(self, row, s):
        return {"x": s["x"] / 2, "iterations": s["iterations"] + 1}

    def terminate(self, row, s):
        return s["x"] <= self.tol

    def iterations(self, s):
        return s["iterations"]


def test_iterate_owns_the_loop_cap_and_status():
    s0 = {"x": jnp.asarray(1.0), "iterations": jnp.asarray(0)}
    s, it, status = iterate(_Halving(), None, s0, 100)
    assert int(it) == 10 and int(status) == Status.SOLVED and float(s["x"]) == 2.0 ** -10
    s, it, status = iterate(_Halving(), None, s0, 4)
    assert int(it) == 4 and int(status) == Status.MAX_ITERS


def test_ratio_program_through_the_one_interface():
    problem, rng = _problem()
    p_hat = rng.dirichlet(np.ones(30), size=2)
    m = problem.moments(jnp.asarray(p_hat))
    r = jnp.asarray(p_hat.min(0) / p_hat.min(0).max())
    sol, state = ADMM().solve(problem, RatioProgram(r, jnp.ones(30, bool), m))
    assert state.x.shape == (31,) and np.isfinite(float(ADMM.ratio_value(sol.p, r)))
    sol, warm = RatioIPM().solve(problem, RatioProgram(r, jnp.ones(30, bool), m))
    assert warm is None and np.isfinite(float(RatioIPM.ratio_value(sol.p, r)))
