"""Sharded decoding and solving (:mod:`jaxens.sharding`) equal the single-device run.

The mesh checks need 8 devices.  On CPU, XLA makes them only when
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax is imported, which in a
shared pytest process (other test files import jax first) is too late.  So the checks marked
``needs8`` run in-process when 8 devices exist and are skipped otherwise, and
``test_eight_device_checks_in_subprocess`` runs this module in a fresh interpreter with the flag
and fails unless every one of them ran and passed (works under ``pytest -n``).

What is checked (float32):

* every objective of :data:`jaxens.objectives.OBJECTIVES` through the bottleneck combiner (default solvers,
  plus ``sum_ce`` with :class:`~jaxens.EntropicNewton`): ``p`` on a mesh within ``1e-5`` of the
  single-device ``p`` (``sum_ce`` with ``EntropicNewton``: ``1e-4`` in float32; the LP-type
  objectives also in float64), same statuses, on 1-D vocabulary meshes of 2, 4, 8 devices, batch-only
  meshes and 2-D ``batch x vocab`` meshes (``v = 252``: the 8-way vocabulary meshes exercise the
  ``-inf`` padding to 256).  Each solver runs on two meshes by default, rotating so that every
  mesh is used; ``JAXENS_SHARDING_FULL=1`` runs every solver on every mesh;
* ``A``/``Q`` really are split (each device holds ``v/k`` rows) and the compiled solve never
  all-gathers them;
* greedy decoding with :class:`~jaxens.sharding.ShardedDecoder` (logit average, bottleneck ``kl``;
  batch, batch x vocab, tensor-parallel members) gives the single-device tokens;
* bad inputs: batch not divisible by the batch axis, unknown / unassigned axis names, ``pad=False``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import jaxens
from jaxens.combiners.bottleneck import bottleneck
from jaxens.sharding import (
    ShardedDecoder,
    ShardingConfig,
    make_mesh,
    pad_logits,
    pad_problem,
    process_local_logits,
    shard_logits,
    shard_problem,
    sharded_bottleneck,
)

NDEV = 8
HAVE8 = jax.device_count() >= NDEV
needs8 = pytest.mark.skipif(
    not HAVE8, reason="needs 8 devices: run by test_eight_device_checks_in_subprocess with XLA_FLAGS"
)
FULL = os.environ.get("JAXENS_SHARDING_FULL", "") == "1"

V = 252  # divisible by 2 and 4, not by 8: 8-way vocabulary meshes pad to 256
DIMS = (6, 5)
B = 8
TOL = 1e-5

# one mesh per solver by default (every mesh shape is used by some solver; the 8-way vocabulary
# meshes pad v=252 to 256); JAXENS_SHARDING_FULL=1: every solver on every mesh
ROTATION = [(1, 8), (2, 4), (4, 2), (1, 2), (1, 4), (8, 1), (2, 4), (1, 8)]
ALL_MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (8, 1), (2, 4), (4, 2)]


def _solver_cases():
    from jaxens.solvers.entropic_newton import EntropicNewton

    cases = [(o, None) for o in jaxens.objectives.OBJECTIVES] + [("sum_ce", EntropicNewton)]
    out = []
    for i, (o, s) in enumerate(cases):
        meshes = ALL_MESHES if FULL else [ROTATION[i]]
        if o == "kl" and not FULL:
            meshes = [(1, 1)] + meshes  # a 1-device mesh goes through the same code
        out.append(pytest.param(o, s, meshes, id=f"{o}-{'default' if s is None else s.__name__}"))
    return out


SOLVER_CASES = _solver_cases()


# ---------------------------------------------------------------- instances


def _lse(x):
    mx = np.max(x)
    return mx + np.log(np.sum(np.exp(x - mx)))


def _fit(W, target, e):
    """Max-entropy logits ``W h + e`` with ``W^T softmax(W h + e) = W^T target`` (feasible instances)."""
    mt = W.T @ target

    def f(h):
        lg = W @ h + e
        return _lse(lg) - h @ mt, W.T @ np.exp(lg - _lse(lg)) - mt

    return minimize(f, np.zeros(W.shape[1]), jac=True, method="BFGS", options=dict(gtol=1e-10, maxiter=2000)).x


@pytest.fixture(scope="module")
def instance():
    rng = np.random.default_rng(0)
    Ws = [rng.normal(size=(V, d)) for d in DIMS]
    # offsets e_i: with exact logits W_i h_i and all members hard, sum_ce / sum_sq_ce are constant
    # on the feasible set (README, "a degeneracy worth knowing") and every feasible p is optimal
    es = [rng.normal(size=V) for _ in Ws]
    logits = [[] for _ in Ws]
    for _ in range(B):
        t = 2.0 * rng.normal(size=V)
        pstar = np.exp(t - _lse(t))
        for i, W in enumerate(Ws):
            logits[i].append(W @ _fit(W, pstar, es[i]) + es[i])
    problem = jaxens.make_problem(Ws)
    return problem, [jnp.asarray(np.stack(l), jnp.float32) for l in logits], Ws


def _options(objective, solver):
    # the least-squares (feasibility) phase is FISTA, checked by the least_squares objective;
    # leaving it out of the others halves the compile time of this file
    kw = dict(check_feasibility=objective == "least_squares")
    if solver is not None:
        kw["solver"] = solver()
    return kw


# ---------------------------------------------------------------- solvers on meshes


# The LP-type objectives are compared in float32 *and* in float64.  WorkingSet (default for sum_ce and
# sum_sq_ce) ends on a crossover vertex / the restricted QP optimum; min_underestimation's default
# RatioIPM's crossover returns the vertex (keyed "ADMM" below, same tolerance); ADMM polishes its answer on the active set (KKT solve, OSQP's solution
# polishing): the vertex / QP optimum is then exact to rounding, so float32 meets TOL like the
# other solvers (before polishing: 3e-4 / 3e-3 between a batch of 1 and 8 on one device).  The
# entropic path of EntropicNewton.the LinearProgram solve ends at a small entropy weight where float32 moves p by
# ~3e-5 between reduction orders; it keeps a float32 tolerance of 1e-4 (float64: TOL).
LP_F32_TOL = {"ADMM": TOL, "WorkingSet": 1e-4, "EntropicNewton": 1e-4}  # WorkingSet float32: 1.7e-5 measured on a 2x4 mesh


def _lp_like(objective, solver):
    if objective == "sum_ce":
        return "EntropicNewton" if solver is not None else "WorkingSet"
    if solver is None and objective in ("sum_sq_ce", "min_underestimation"):
        return "WorkingSet" if objective == "sum_sq_ce" else "ADMM"
    return None


def _compare(problem, logits, objective, solver, meshes, tol):
    comb = bottleneck(problem, objective, **_options(objective, solver))
    _, _, ref = jax.jit(comb.combine)(logits, comb.init(B))
    # min_underestimation: a row its solver does not certify is MAX_ITERS; its answer is still
    # compared (same statuses, same p)
    allowed = (0, 1) if objective == "min_underestimation" else (0,)
    assert np.all(np.isin(np.asarray(ref.status), allowed)), f"single-device reference not solved: {ref.status}"
    for batch, vocab in meshes:
        cfg = ShardingConfig(make_mesh(batch, vocab))
        sc = sharded_bottleneck(problem, cfg, objective, **_options(objective, solver))
        state = sc.init(B)
        logp, state2, sol = jax.jit(sc.combine)(logits, state)
        v_pad = cfg.padded_vocab(V)
        A = state.problem.A
        assert A.shape == (v_pad, sum(DIMS))
        assert {s.data.shape for s in A.addressable_shards} == {(v_pad // vocab, sum(DIMS))}
        assert sol.p.shape == (B, V) and logp.shape == (B, V)
        err = float(jnp.max(jnp.abs(sol.p - ref.p)))
        print(f"SHARDING {objective} {sol.p.dtype} mesh {batch}x{vocab}: max|p - p_1dev| = {err:.2e}")
        assert err <= tol, f"{objective} on mesh batch={batch} x vocab={vocab}: max |p - p_1dev| = {err:.2e}"
        np.testing.assert_array_equal(np.asarray(sol.status), np.asarray(ref.status))
        np.testing.assert_allclose(np.asarray(jnp.sum(sol.p, -1)), 1.0, atol=1e-5)


@needs8
@pytest.mark.parametrize("objective, solver, meshes", SOLVER_CASES)
def test_sharded_solver_equals_single_device(instance, objective, solver, meshes):
    problem, logits, Ws = instance
    lp = _lp_like(objective, solver)
    if lp is not None:
        _compare(problem, logits, objective, solver, meshes, LP_F32_TOL[lp])
        with jax.enable_x64(True):
            p64 = jaxens.make_problem(Ws, dtype=jnp.float64)
            _compare(p64, [l.astype(jnp.float64) for l in logits], objective, solver, meshes, TOL)
    else:
        _compare(problem, logits, objective, solver, meshes, TOL)


@needs8
def test_compiled_solve_never_gathers_the_matrices(instance):
    """GSPMD keeps ``A``/``Q`` split: no all-gather in the compiled program yields a ``v x D`` block."""
    problem, logits, _ = instance
    cfg = ShardingConfig(make_mesh(2, 4))
    for objective in ("kl",):  # Newton, then the FISTA least-squares phase
        sc = sharded_bottleneck(problem, cfg, objective, check_feasibility=True)
        hlo = jax.jit(sc.combine).lower(logits, sc.init(B)).compile().as_text()
        gathers = [l for l in hlo.splitlines() if "all-gather(" in l or "all-gather-start(" in l]
        full = re.compile(rf"\[{V},\d+\]")
        big = [l for l in gathers if full.search(l.split("all-gather")[0])]
        assert not big, f"{objective}: the compiled solve gathers a full v x D matrix:\n" + "\n".join(big[:3])
        assert "all-reduce" in hlo  # A^T p over the vocabulary shards


@needs8
def test_process_local_logits_single_process(instance):
    _, logits, _ = instance
    cfg = ShardingConfig(make_mesh(2, 4))
    x = process_local_logits(np.asarray(logits[0]), cfg)
    assert x.sharding.spec == cfg.logits_sharding().spec
    np.testing.assert_array_equal(np.asarray(x), np.asarray(shard_logits(logits[0], cfg)))


# ---------------------------------------------------------------- decoding on meshes

PROMPTS = [[5, 9, 2, 7, 1], [3], [11, 4, 4, 8, 30, 2, 6, 17, 9, 1, 40], [7, 7], [1, 2, 3], [200, 100], [9], [42, 43, 44]]


@pytest.fixture(scope="module")
def toy_members():
    from toy_models import ToyConfig, ToyLM

    cfg = ToyConfig(vocab_size=256, d_model=16, n_heads=4, n_kv_heads=2, head_dim=4)
    return [ToyLM(cfg, seed=0), ToyLM(cfg, seed=1)]


W_AVG = (0.6, 0.4)
DECODE_MESHES = [(8, 1, 1), (2, 4, 1), (2, 1, 4)] + ([(1, 8, 1), (4, 2, 1), (1, 1, 8), (2, 2, 2)] if FULL else [])


@pytest.fixture(scope="module")
def ref_logit_average(toy_members):
    from jaxens.sampling import Sampler

    dec = jaxens.Decoder(toy_members, jaxens.logit_average(jnp.array(W_AVG)), Sampler(greedy=True), cache_len=64)
    return dec.generate(PROMPTS, 10)


@needs8
@pytest.mark.parametrize("batch, vocab, model", DECODE_MESHES)
def test_sharded_greedy_decoding_logit_average(toy_members, ref_logit_average, batch, vocab, model):
    from jaxens.sampling import Sampler

    w = jnp.array(W_AVG)
    ref = ref_logit_average
    cfg = ShardingConfig(make_mesh(batch, vocab, model), model_axis="model")
    dec = ShardedDecoder(toy_members, jaxens.logit_average(w), Sampler(greedy=True), config=cfg, cache_len=64)
    if model > 1:  # tensor-parallel members: some weight is really split over the model axis
        specs = [x.sharding.spec for x in jax.tree.leaves(dec._states[0])]
        assert any("model" in s for s in specs)
    out = dec.generate(PROMPTS, 10)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


@needs8
@pytest.mark.parametrize("batch, vocab", [(2, 4)] + ([(1, 8), (8, 1)] if FULL else []))
def test_sharded_greedy_decoding_bottleneck(toy_members, batch, vocab):
    from jaxens.sampling import Sampler

    Ws, bs = zip(*(m.unembedding() for m in toy_members))
    problem = jaxens.make_problem(Ws, bs)
    ref = jaxens.Decoder(toy_members, bottleneck(problem, "kl"), Sampler(greedy=True), cache_len=64)
    ref_out = ref.generate(PROMPTS, 6)
    cfg = ShardingConfig(make_mesh(batch, vocab))
    dec = ShardedDecoder(toy_members, sharded_bottleneck(problem, cfg, "kl"), Sampler(greedy=True), config=cfg, cache_len=64)
    out = dec.generate(PROMPTS, 6)
    np.testing.assert_array_equal(out.tokens, ref_out.tokens)
    assert out.lengths.tolist() == ref_out.lengths.tolist()


# ---------------------------------------------------------------- bad input


@needs8
def test_bad_inputs_on_a_mesh(instance, toy_members):
    from jaxens.sampling import Sampler

    problem, logits, _ = instance
    cfg = ShardingConfig(make_mesh(4, 2))
    with pytest.raises(ValueError, match=r"batch of 6 rows is not divisible by the 4 devices of mesh axis 'batch'"):
        shard_logits(logits[0][:6], cfg)
    sc = sharded_bottleneck(problem, cfg, "kl")
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        sc.init(6)
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        jax.jit(sc.combine)([l[:6] for l in logits], None)
    dec = ShardedDecoder(toy_members, jaxens.logit_average(), Sampler(greedy=True), config=cfg, cache_len=64)
    with pytest.raises(ValueError, match="batch of 3 rows is not divisible"):
        dec.generate(PROMPTS[:3], 2)
    # an axis of the mesh that the config does not know
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "vocab"))
    with pytest.raises(ValueError, match=r"mesh axis 'data' \(size 2\) is not known to this ShardingConfig"):
        ShardingConfig(mesh, batch_axis=None)
    with pytest.raises(ValueError, match=r"batch_axis='batch' is not an axis of the mesh; the mesh has axes \('data', 'vocab'\)"):
        ShardingConfig(mesh)
    ShardingConfig(mesh, batch_axis="data")  # named: fine
    with pytest.raises(ValueError, match="not divisible by the 8 devices of mesh axis 'vocab'"):
        shard_problem(problem, make_mesh(1, 8), pad=False)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        shard_logits(logits[0], make_mesh(1, 8), pad=False)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(4, 4)


# ---------------------------------------------------------------- any device count


@pytest.mark.no_typecheck
def test_config_rejects_unknown_axis_names():
    mesh = make_mesh(1, 1, 1)
    with pytest.raises(ValueError, match=r"vocab_axis='tokens' is not an axis of the mesh; the mesh has axes \('batch', 'vocab', 'model'\)"):
        ShardingConfig(mesh, vocab_axis="tokens")
    with pytest.raises(ValueError, match="given two roles"):
        ShardingConfig(mesh, vocab_axis="batch")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        shard_problem(jaxens.make_problem([np.eye(4)]), mesh, vocab_axis="vocabulary")
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        ShardingConfig("mesh")


@pytest.mark.parametrize("objective", ["kl", "least_squares"])
def test_padding_with_masked_tokens_equals_unpadded(instance, objective):
    """Zero rows in A/Q and -inf logits for 4 extra tokens: same p on the real tokens, 0 on the pads."""
    problem, logits, _ = instance
    comb = bottleneck(problem, objective)
    _, _, ref = jax.jit(comb.combine)(logits, comb.init(B))
    padded = pad_problem(problem, V + 4)
    np.testing.assert_array_equal(np.asarray(padded.T_pinv), np.asarray(problem.T_pinv))
    pc = bottleneck(padded, objective)
    _, _, sol = jax.jit(pc.combine)(pad_logits(logits, V + 4), pc.init(B))
    assert float(jnp.max(jnp.abs(sol.p[:, :V] - ref.p))) <= TOL
    assert float(jnp.max(sol.p[:, V:])) == 0.0
    np.testing.assert_array_equal(np.asarray(sol.status), np.asarray(ref.status))


# ---------------------------------------------------------------- the 8-device run


def _needs8_count() -> int:
    n = sum(len(c.values[2]) > 0 for c in SOLVER_CASES)  # one test per solver case
    n += 3  # gathers, process-local, bad inputs
    n += len(DECODE_MESHES)  # logit-average decoding meshes
    n += 3 if FULL else 1  # bottleneck decoding meshes
    return n


@pytest.mark.skipif(HAVE8, reason="this process already has 8 devices: the checks ran in-process")
def test_eight_device_checks_in_subprocess():
    here = Path(__file__).resolve()
    env = dict(os.environ)
    # --xla_cpu_multi_thread_eigen=false: virtual CPU devices sharing XLA's Eigen pool can deadlock
    # in the batched LAPACK custom calls of the Newton solvers (seen at v=16384)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NDEV} --xla_cpu_multi_thread_eigen=false"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
           "-k", "not test_config_rejects and not test_padding_with and not in_subprocess and not two_processes"]
    proc = subprocess.run(cmd, cwd=here.parents[2], env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"8-device checks failed:\n{out[-6000:]}"
    summary = out.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) == _needs8_count(), f"expected {_needs8_count()} passed checks:\n{out[-3000:]}"
    assert "skipped" not in summary and "deselected" in summary, summary


@pytest.mark.slow
@pytest.mark.skipif(HAVE8, reason="spawns its own processes; run from a 1-device pytest")
def test_two_processes_jax_distributed():
    """The several-hosts recipe on one machine: 2 processes x 4 CPU devices, jax.distributed over gloo.

    Runs ``examples/sharded_decode.py`` in both processes (``--check``): the decoded tokens equal
    the one-device decoder's.
    """
    import socket

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(root / "examples" / "sharded_decode.py"), "--coordinator", f"localhost:{port}",
           "--num-processes", "2", "--check", "--new-tokens", "6", "--combiner", "logit_average",
           "--batch-axis", "2", "--vocab-axis", "4"]  # the mesh spans both processes' 4 devices
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "2 process(es), 8 devices" in outs[0]
    assert "tokens identical to the single-device decoder: True" in outs[0]
