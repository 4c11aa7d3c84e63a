"""Speed paths of the members: unrolled vs scanned layers, logits only where needed, and ME
steps that run only the drawn member (plus full pending buffers), without logits for catch-ups."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from toy_models import ToyConfig, ToyLM

from jaxens.decode import Decoder
from jaxens.combiners.mixture import me, me_step
from jaxens.models.base import accepts_logits_keyword
from jaxens.models.forward import full_logits
from jaxens.models.gemma3 import Gemma3, Gemma3Config
from jaxens.models.gpt2 import GPT2, GPT2Config
from jaxens.models.llama import Llama, LlamaConfig
from jaxens.models.loading import load_hf_dir, save_hf_dir
from jaxens.sampling import Sampler

CONFIGS = {
    "llama": (Llama, lambda **kw: LlamaConfig.tiny(n_layers=3, **kw)),
    "qwen2": (Llama, lambda **kw: LlamaConfig.tiny(qkv_bias=True, model_type="qwen2", tie_embeddings=False, **kw)),
    "gemma3": (Gemma3, lambda **kw: Gemma3Config.tiny(**kw)),
    "gpt2": (GPT2, lambda **kw: GPT2Config.tiny(**kw)),
}


def _pair(family):
    """The same random weights stored per layer (unrolled) and stacked (scan)."""
    cls, cfg = CONFIGS[family]
    unrolled = cls(cfg(), rngs=nnx.Rngs(3))
    assert not unrolled.config.scan_layers
    params = {k: jnp.asarray(v) for k, v in unrolled.params_numpy().items()}
    scanned = cls(cfg(scan_layers=True), params)
    return unrolled, scanned


def _call(model, toks, start, logits="all", S=16):
    b, t = toks.shape
    cache = model.init_cache(b, S)
    kv = jnp.ones((b, S), bool)
    pos = (start + jnp.arange(t))[None].repeat(b, 0).astype(jnp.int32)
    if start:  # fill the first slots so that the chunk attends to a non-empty cache
        pre = jnp.asarray(np.arange(start * b).reshape(b, start) % model.config.vocab_size, jnp.int32)
        _, cache = model(pre, jnp.arange(start)[None].repeat(b, 0).astype(jnp.int32), cache, jnp.int32(0), kv)
    return model(jnp.asarray(toks), pos, cache, jnp.int32(start), kv, logits=logits)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unrolled_and_scanned_layers_agree(family):
    unrolled, scanned = _pair(family)
    v = unrolled.config.vocab_size
    toks = np.random.default_rng(0).integers(0, v, (2, 7)).astype(np.int32)
    (lu, cu), (ls, cs) = _call(unrolled, toks, 3), _call(scanned, toks, 3)
    np.testing.assert_allclose(np.asarray(lu), np.asarray(ls), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cu.k), np.asarray(cs.k), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cu.v), np.asarray(cs.v), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(full_logits(unrolled, toks)), np.asarray(full_logits(scanned, toks)),
                               atol=2e-5, rtol=0)
    for k, w in unrolled.params_numpy().items():
        np.testing.assert_array_equal(scanned.params_numpy()[k], w, err_msg=k)
    assert isinstance(unrolled.layers, nnx.List) and len(unrolled.layers) == unrolled.config.n_layers
    assert isinstance(scanned.layers, nnx.Dict)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_keyword_selects_positions(family):
    model, _ = _pair(family)
    assert accepts_logits_keyword(model)
    v = model.config.vocab_size
    toks = np.random.default_rng(1).integers(0, v, (2, 6)).astype(np.int32)
    full, cache = _call(model, toks, 2)
    assert full.shape == (2, 6, v)
    last, c_last = _call(model, toks, 2, "last")
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5, rtol=0)
    none, c_none = _call(model, toks, 2, "none")
    assert none is None
    np.testing.assert_array_equal(np.asarray(c_none.k), np.asarray(cache.k))
    np.testing.assert_array_equal(np.asarray(c_last.v), np.asarray(cache.v))

    @jax.jit
    def at(t):  # a traced position
        return _call(model, toks, 2, t)[0]

    for t in (0, 3, 5):
        np.testing.assert_allclose(np.asarray(at(jnp.int32(t))), np.asarray(full[:, t : t + 1]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits"):
        _call(model, toks, 2, "first")
    with pytest.raises(ValueError, match="int scalar"):
        _call(model, toks, 2, jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("scan", [False, True])
def test_hf_dir_round_trip_both_layouts(scan, tmp_path):
    model = Llama(LlamaConfig.tiny(tie_embeddings=False, scan_layers=scan), rngs=nnx.Rngs(5))
    save_hf_dir(model, tmp_path)
    again = load_hf_dir(tmp_path)  # loads in the default (unrolled) layout
    assert dataclasses.replace(again.config, scan_layers=scan) == model.config
    toks = np.random.default_rng(2).integers(0, 97, (1, 9)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(full_logits(again, toks)), np.asarray(full_logits(model, toks)),
                               atol=2e-5, rtol=0)


def test_decoder_greedy_same_for_both_layouts():
    unrolled, scanned = _pair("llama")
    prompts = [[1, 5, 9, 3], [7, 2]]
    outs = [Decoder([m], me(max_pending=4), Sampler(), cache_len=64).generate(prompts, 6, seed=3).tokens
            for m in (unrolled, scanned)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_members_without_the_keyword_still_decode():
    toy = ToyLM(ToyConfig(vocab_size=24), seed=0)
    assert not accepts_logits_keyword(toy)
    llama = Llama(LlamaConfig.tiny(vocab_size=24), rngs=nnx.Rngs(0))
    out = Decoder([toy, llama], me(), Sampler(), cache_len=64).generate([[1, 2, 3]], 5, seed=0)
    assert out.lengths.tolist() == [5]


def test_me_step_runs_only_drawn_and_full_members():
    """A forward that records (member, chunk length, logits request) from inside the switch branch:
    only branches that execute record, so skipped members must not appear."""
    n, B, V, P = 3, 2, 5, 4
    ens = me(max_pending=P)
    calls = []

    def record(j, T, kind):
        calls.append((int(j), int(T), int(kind)))

    def forward(j, T, cache, start, logits="all"):
        kind = 0 if isinstance(logits, str) and logits == "none" else 1
        jax.debug.callback(record, j, T, kind)
        out = None if kind == 0 else jnp.full((B, 1, V), float(j))
        return out, cache + T

    step = jax.jit(lambda cached, length, key: me_step(ens, forward, (jnp.zeros(()),) * n, cached, length, key,
                                                       (B, V)))
    for seed in range(12):
        cached = jnp.asarray([9, 12, 11], jnp.int32)  # pending 4 (full), 1, 2 at length 13
        calls.clear()
        logp, caches, new_cached, info = step(cached, jnp.int32(13), jax.random.key(seed))
        jax.effects_barrier()
        d = int(info.member)
        pending = [4, 1, 2]
        size = {1: 1, 2: 2, 3: 4, 4: 4}[pending[d]]
        want = {(d, size, 1)}
        if d != 0:
            want.add((0, P, 0))  # member 0's buffer is full: caught up eagerly, no logits
        assert set(calls) == want, (d, calls)
        assert len(calls) == len(want)
        np.testing.assert_allclose(np.exp(np.asarray(logp)), 1.0 / V, atol=1e-6)
        assert new_cached.tolist() == [13 if j == d or j == 0 else int(cached[j]) for j in range(n)]
        assert info.eager.tolist() == [d != 0, False, False]


def test_greedy_decode_with_last_position_logits_matches_full_forward():
    """The decode loop asks members for ``logits="last"`` / ``"none"``: greedy decoding must still be
    the token-by-token argmax of the full (uncached, all-position) forward."""
    from jaxens.combiners.averaging import logit_average

    model = Llama(LlamaConfig.tiny(n_layers=2), rngs=nnx.Rngs(9))
    prompts = [[4, 8, 15, 16, 23], [42, 7]]
    out = Decoder([model], logit_average(), Sampler(greedy=True), cache_len=64).generate(prompts, 6)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(6):
            seq.append(int(np.argmax(np.asarray(full_logits(model, np.asarray([seq], np.int32)))[0, -1])))
        assert out.tokens[b].tolist() == seq[len(p):]
