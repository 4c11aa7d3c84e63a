"""Where a decode step's KL Newton solve spends its time (v = 49,152, hard = smollm2-tiny-64).

The bottleneck combiner alone over 64 consecutive real rows of alice29.txt (SmolLM2-135M and
smollm2-tiny-64 logits), in a ``lax.scan`` with warm starts, outside the decode loop: ms per
step, Newton iterations and status counts; then the per-iteration primitives (the ``v x k``
mat-vecs, ``top_k``, ``log_softmax``).  The combiner state, which carries the problem, is a jit
argument as in the decode loop (not a folded constant).

    python benchmarks/bottleneck_solve_profile.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.combiners.bottleneck import bottleneck
from jaxens.harness.data import data_root
from jaxens.harness import zoo
from jaxens.models.forward import full_logits
from jaxens.problem import make_problem
from jaxens.solvers.entropic_newton import EntropicNewton


def timeit(f, *args, n: int = 5):
    """``(ms per call, result)`` after one warm-up (compile) call."""
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / n * 1000, out


def main():
    big, tok = zoo.load("smollm2-135m", progress=False)
    small = zoo.load_model("smollm2-tiny-64", progress=False)
    ids = jnp.asarray([tok.encode((data_root() / "alice29.txt").read_text()[5000:7000])[:96]])
    x = jnp.stack([full_logits(big, ids)[0], full_logits(small, ids)[0]], axis=1)[32:]  # (64, 2, v)
    problem = make_problem([big.unembedding()[0], small.unembedding()[0]], hard=(1,))
    print(f"Q {problem.Q.shape}, A {problem.A.shape}, {x.shape[0]} rows")

    for topk, tol in ((1024, None), (2048, None), (4096, None), (None, None), (2048, 1e-4)):
        comb = bottleneck(problem, "kl", solver=EntropicNewton(hessian_topk=topk, tol=tol))

        @jax.jit
        def run(x, state, comb=comb):
            def step(state, row):
                _, state, sol = comb.combine([row[None, 0], row[None, 1]], state)
                return state, (sol.iterations, sol.status)

            return jax.lax.scan(step, state, x)[1]

        ms, (its, status) = timeit(run, x, comb.init(1), n=2)
        print(f"topk={topk} tol={tol}: {ms / x.shape[0]:.1f} ms/step, iterations mean "
              f"{np.mean(its):.2f} max {np.max(its)} (histogram {np.bincount(np.asarray(its).ravel()).tolist()}), "
              f"status counts {np.bincount(np.asarray(status).ravel()).tolist()}", flush=True)

    G, p, delta = problem.Q, jax.nn.softmax(x[18, 0]), jnp.ones(problem.Q.shape[1])
    print("G @ delta   %.2f ms" % timeit(jax.jit(lambda G, d: G @ d), G, delta, n=50)[0])
    print("p @ G       %.2f ms" % timeit(jax.jit(lambda G, p: p @ G), G, p, n=50)[0])
    print("top_k 1024  %.2f ms" % timeit(jax.jit(lambda p: jax.lax.top_k(p, 1024)[1]), p, n=50)[0])
    print("log_softmax %.2f ms" % timeit(jax.jit(jax.nn.log_softmax), p, n=50)[0])


if __name__ == "__main__":
    main()
