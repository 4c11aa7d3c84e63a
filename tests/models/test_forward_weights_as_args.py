"""The member's weights enter the compiled forwards as arguments: no large constant in the
lowered program, no copy per call (the member's buffers stay the same), live buffers flat over
repeated calls, one trace for repeated same-shape calls, and the same logits as an eager call."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxens.models import forward
from jaxens.models.forward import full_logits, token_nll
from jaxens.models.gpt2 import GPT2, GPT2Config
from jaxens.models.llama import Llama, LlamaConfig

MODELS = {
    "llama": lambda: Llama(LlamaConfig.tiny(vocab_size=512, tie_embeddings=False), rngs=nnx.Rngs(0)),
    "llama_scan": lambda: Llama(LlamaConfig.tiny(vocab_size=512, scan_layers=True), rngs=nnx.Rngs(1)),
    "gpt2": lambda: GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(2)),
}
_CONST = re.compile(r"constant dense<(.{0,3})[^>]*> : tensor<([0-9x]*)x?(?:f32|bf16|f16|f64)>")


def _large_constants(text: str, limit: int = 64) -> list[str]:
    """Non-splat float constants with more than ``limit`` elements in a StableHLO text."""
    out = []
    for m in _CONST.finditer(text):
        payload, shape = m.group(1), m.group(2)
        n = int(np.prod([int(s) for s in shape.split("x") if s])) if shape else 1
        if n > limit and (payload.startswith('"0x') or payload.startswith("[")):
            out.append(m.group(0)[:80])
    return out


def _pointers(model) -> list[int]:
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_forward_hlo_has_no_weight_constants(kind):
    model = MODELS[kind]()
    toks = jnp.zeros((2, 16), jnp.int32)
    graphdef, state = nnx.split(model)
    pos = jnp.zeros((2, 16), jnp.int32)
    text = forward._forward.jitted.lower(graphdef, state, toks, pos, jnp.ones((2, 16), bool)).as_text()
    assert _large_constants(text) == []
    # the detector sees weights closed over as constants
    closed = jax.jit(lambda t, p, m: forward._forward_fn(model, t, p, m)).lower(toks, pos, jnp.ones((2, 16), bool))
    assert _large_constants(closed.as_text())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_repeated_forwards_keep_buffers_flat(kind):
    model = MODELS[kind]()
    toks = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32))
    before = _pointers(model)
    first = np.asarray(full_logits(model, toks))
    counts = []
    for _ in range(4):
        out = full_logits(model, toks)
        np.testing.assert_array_equal(np.asarray(out), first)  # bit-identical call to call
        del out
        live = jax.live_arrays()
        counts.append((len(live), sum(x.nbytes for x in live)))
        del live
    assert len(set(counts)) == 1, counts
    assert _pointers(model) == before  # the member's weights were neither copied nor replaced


def test_full_logits_compiles_once_and_matches_eager():
    model = MODELS["llama"]()
    toks = np.random.default_rng(1).integers(0, 512, (1, 12))
    full_logits(model, toks)
    size = forward._forward.jitted._cache_size()
    for _ in range(3):
        got = np.asarray(full_logits(model, toks))
    assert forward._forward.jitted._cache_size() == size
    t = jnp.asarray(toks, jnp.int32)
    eager = np.asarray(forward._forward_fn(model, t, jnp.arange(12, dtype=jnp.int32)[None], jnp.ones((1, 12), bool)))
    np.testing.assert_allclose(got, eager, atol=1e-5, rtol=1e-5)


def test_token_nll_weights_untouched_and_matches_full_logits():
    model = MODELS["llama"]()
    toks = np.random.default_rng(2).integers(0, 512, 40)
    before = _pointers(model)
    nll = token_nll(model, toks, chunk=16)
    assert _pointers(model) == before
    lp = jax.nn.log_softmax(jnp.asarray(full_logits(model, toks[None])[0]), axis=-1)
    want = -np.asarray(lp)[np.arange(39), toks[1:]]
    np.testing.assert_allclose(nll, want, atol=1e-4)
