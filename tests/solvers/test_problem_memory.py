"""make_problem holds one copy of A in the working dtype plus the basis Q.

Its host buffers are numpy arrays (reported to ``tracemalloc``) that jax adopts without a copy
on the CPU, so the traced peak of ``make_problem`` is its working memory.  With float32
unembeddings it must stay within 1.3x the bytes of ``A`` and ``Q`` (float32): the row blocks of
the float64 passes are shrunk to 256 KiB so that, as at real sizes, they are small beside ``A``.
"""

import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

import jaxens
import jaxens.problem as problem_mod


def test_make_problem_peak_is_one_float32_copy_plus_basis(monkeypatch):
    monkeypatch.setattr(problem_mod, "ROW_BLOCK_BYTES", 1 << 18)
    rng = np.random.default_rng(0)
    v = 20000
    Ws = [jnp.asarray(rng.normal(size=(v, d)), jnp.float32) for d in (64, 47)]
    b = jnp.asarray(rng.normal(size=v), jnp.float32)
    jaxens.make_problem(Ws, [None, b])  # warm-up (imports, small compiles)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        P = jaxens.make_problem(Ws, [None, b])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    held = P.A.nbytes + P.Q.nbytes
    assert P.A.dtype == jnp.float32 and P.A.shape == (v, 112) and P.rank == 113
    assert peak <= 1.3 * held, f"make_problem peaked at {peak / held:.2f}x A + Q"
    assert peak >= 0.9 * held  # A and Q were traced: jax adopted the numpy buffers
    # same problem as a float64 build, to float32 accuracy
    with jax.enable_x64(True):
        P64 = jaxens.make_problem([np.asarray(W, np.float64) for W in Ws], [None, np.asarray(b, np.float64)],
                                  dtype=jnp.float64)
        Q64 = np.asarray(P64.Q)
    Q = np.asarray(P.Q, np.float64)
    # same span: the projector onto span(Q) agrees
    x = rng.normal(size=(v, 3))
    np.testing.assert_allclose(Q @ (Q.T @ x), Q64 @ (Q64.T @ x), atol=1e-4)
    np.testing.assert_allclose(Q.T @ Q, np.eye(P.rank), atol=1e-4)
