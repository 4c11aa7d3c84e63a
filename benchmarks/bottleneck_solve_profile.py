"""Where a decode step's KL Newton solve spends its time (v = 49,152, hard = smollm2-tiny-64).

The bottleneck combiner alone, over 64 consecutive real rows of alice29.txt (SmolLM2-135M and
smollm2-tiny-64 logits), in a ``lax.scan`` with warm starts: ms per step, Newton iterations,
status counts; then the per-iteration primitives.  Run: ``python benchmarks/bottleneck_solve_profile.py``.
"""
import os, time
import jax, jax.numpy as jnp, numpy as np
from pathlib import Path
from jaxens.data import data_root
from jaxens.models import zoo
from jaxens.models.forward import full_logits
from jaxens.problem import make_problem
from jaxens.combiners.bottleneck import bottleneck
from jaxens.solvers.newton import EntropicNewton

m1, tok = zoo.load("smollm2-135m", progress=False)
m2 = zoo.load_model("smollm2-tiny-64", progress=False)
text = (data_root() / "alice29.txt").read_text()
ids = jnp.asarray([tok.encode(text[5000:7000])[:96]])
L1 = full_logits(m1, ids)[0]; L2 = full_logits(m2, ids)[0]
prob = make_problem([m1.unembedding()[0], m2.unembedding()[0]], hard=(1,))
print("Q", prob.Q.shape, "A", prob.A.shape)
x = jnp.stack([L1, L2], axis=1)[32:96]  # (64, 2, v)

def timeit(f, *a, n=5):
    jax.block_until_ready(f(*a)); t = time.perf_counter()
    for _ in range(n): r = jax.block_until_ready(f(*a))
    return (time.perf_counter() - t) / n * 1000, r

for topk in [1024, None]:
  for tol in [None, 1e-4]:
    solver = EntropicNewton(hessian_topk=topk, tol=tol)
    comb = bottleneck(prob, "kl", solver=solver)
    @jax.jit
    def run_seq(x):
        state = comb.init(1)
        def step(state, xr):
            lp, state, sol = comb.combine([xr[None, 0], xr[None, 1]], state)
            return state, (sol.iterations, sol.status, lp)
        _, out = jax.lax.scan(step, state, x)
        return out
    ms, (its, st, lp) = timeit(run_seq, x, n=2)
    print(f"topk={topk} tol={tol}: {ms/x.shape[0]:.1f} ms/step, iters mean {np.mean(its):.1f} max {np.max(its)}, status {np.bincount(np.asarray(st).ravel())}", flush=True)

G = prob.Q; v = G.shape[0]
p = jax.nn.softmax(L1[50])
d = jnp.ones(G.shape[1])
print("G@d %.2f ms" % timeit(jax.jit(lambda G, d: G @ d), G, d, n=50)[0])
print("p@G %.2f ms" % timeit(jax.jit(lambda G, p: p @ G), G, p, n=50)[0])
print("top_k 1024 %.2f ms" % timeit(jax.jit(lambda p: jax.lax.top_k(p, 1024)[1]), p, n=50)[0])
print("log_softmax %.2f ms" % timeit(jax.jit(jax.nn.log_softmax), p, n=50)[0])
