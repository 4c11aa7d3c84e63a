"""ME: exactness against probability averaging, cache catch-up, batch-wide member draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM, reference_kv, reference_logits

from jaxens.combiners.averaging import combine_logit_average, combine_prob_average
from jaxens.decode import Decoder
from jaxens.combiners.mixture import MixtureEnsemble, me
from jaxens.sampling import Sampler

PROMPTS = [[5, 9, 2, 7, 1], [3], [11, 4, 4, 8, 13, 2, 6, 17, 9, 1, 20]]


@pytest.fixture(scope="module")
def members():
    # a low logit scale keeps the distributions spread, so many tokens are tested
    cfg = ToyConfig(vocab_size=24, logit_scale=1.5)
    return [ToyLM(cfg, seed=0), ToyLM(cfg, seed=1)]


def _greedy_ref(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(reference_logits(model, seq)[-1])))
    return seq[len(prompt) :]


def test_next_token_distribution_is_probability_average(members):
    w = np.array([0.3, 0.7])
    prefix = [5, 9, 2]
    dec = Decoder(members, me(w), Sampler(), cache_len=64)
    B, N = 32, 300
    v = 24
    per_call = np.zeros((N, v))
    draws = np.zeros(2)
    for c in range(N):
        out = dec.generate([prefix] * B, 1, seed=c)
        per_call[c] = np.bincount(out.tokens[:, 0], minlength=v) / B
        draws += out.stats.draws
    assert dec.num_traces == {"prefill": 1, "run": 1}
    assert draws.sum() == N
    assert abs(draws[1] / N - 0.7) < 5 * np.sqrt(0.21 / N)
    ps = np.stack([np.exp(np.asarray(jax.nn.log_softmax(reference_logits(m, prefix)[-1]))) for m in members])
    lp_mix, _ = combine_prob_average([jnp.asarray(reference_logits(m, prefix)[-1:]) for m in members], jnp.asarray(w))
    p_mix = np.exp(np.asarray(lp_mix[0], np.float64))
    np.testing.assert_allclose(p_mix, w @ ps, atol=1e-6)
    # exact variance of a per-call frequency vector: member draw + multinomial within the call
    var = w @ (ps - p_mix) ** 2 + w @ (ps * (1 - ps)) / B
    q = per_call.mean(0)
    z = (q - p_mix) / np.sqrt(var / N)
    assert np.max(np.abs(z)) < 5, z
    assert np.sum(z**2) < v + 6 * np.sqrt(2 * v)
    # the same statistic rejects the logit average (the test has power)
    lp_geo, _ = combine_logit_average([jnp.asarray(reference_logits(m, prefix)[-1:]) for m in members], jnp.asarray(w))
    z_geo = (q - np.exp(np.asarray(lp_geo[0]))) / np.sqrt(var / N)
    assert np.sum(z_geo**2) > v + 6 * np.sqrt(2 * v)


def test_cache_catch_up_matches_fresh_forward(members):
    dec = Decoder(members, me([0.8, 0.2], max_pending=4), Sampler(), cache_len=64)
    out = dec.generate(PROMPTS, 25, seed=0, return_state=True)
    s = out.state
    assert out.stats.eager_catchups[1] > 0  # the light member fell 4 behind at least once
    assert out.stats.draws.sum() == 25
    length = int(s.length)
    pad = np.asarray(s.pad)
    tokens = np.asarray(s.tokens)
    kv_mask = jnp.arange(tokens.shape[1])[None] >= jnp.asarray(pad)[:, None]
    for j, m in enumerate(members):
        c = int(s.cached[j])
        assert length - 4 <= c < length
        cache = s.caches[j]
        for b in range(len(PROMPTS)):
            seq = tokens[b, pad[b] : length].tolist()
            assert seq[: len(PROMPTS[b])] == PROMPTS[b]
            k_ref, v_ref = reference_kv(m, seq[: c - pad[b]])
            np.testing.assert_allclose(np.asarray(cache.k[:, b, pad[b] : c]), k_ref, atol=2e-5)
            np.testing.assert_allclose(np.asarray(cache.v[:, b, pad[b] : c]), v_ref, atol=2e-5)
        # catch the pending tokens up from the decoded cache: logits equal a fresh full forward
        T = length - c
        pos = jnp.asarray(np.maximum(np.arange(c, length)[None] - pad[:, None], 0), jnp.int32)
        logits, _ = m(jnp.asarray(tokens[:, c:length]), pos, cache, jnp.int32(c), kv_mask)
        for b in range(len(PROMPTS)):
            ref = reference_logits(m, tokens[b, pad[b] : length].tolist())
            np.testing.assert_allclose(np.asarray(logits[b]), ref[-T:], atol=1e-4)


def test_one_member_drawn_for_the_whole_batch(members):
    # published behaviour (opt-in): greedy on the drawn member; every row uses the same member per step
    dec = Decoder(members, me(per_member_truncation=True, max_pending=2), Sampler(greedy=True), cache_len=64)
    out = dec.generate(PROMPTS, 12, seed=3, return_state=True)
    tokens = np.asarray(out.state.tokens)
    pad = np.asarray(out.state.pad)
    for t in range(12):
        cands = []
        for m in members:
            ok = True
            for b in range(len(PROMPTS)):
                prefix = tokens[b, pad[b] : 16 + t].tolist()
                ok &= int(np.argmax(reference_logits(m, prefix)[-1])) == int(tokens[b, 16 + t])
            cands.append(ok)
        assert any(cands), f"step {t}: no single member explains every row's token"
    assert out.stats.draws.sum() == 12 and min(out.stats.draws) > 0


def test_zero_weight_member_is_caught_up_eagerly(members):
    dec = Decoder(members, me([1.0, 0.0], max_pending=3, per_member_truncation=True), Sampler(greedy=True), cache_len=64)
    out = dec.generate([PROMPTS[0]], 10, return_state=True)
    assert out.tokens[0].tolist() == _greedy_ref(members[0], PROMPTS[0], 10)
    assert out.stats.draws.tolist() == [10, 0]
    assert out.stats.eager_catchups[1] == 3  # pending reaches 3 at steps 2, 5, 8
    assert out.stats.forward_tokens.tolist() == [10, 9]


def test_single_member_me(members):
    dec = Decoder([members[1]], me(per_member_truncation=True), Sampler(greedy=True), cache_len=64)
    assert dec.generate([PROMPTS[2]], 6).tokens[0].tolist() == _greedy_ref(members[1], PROMPTS[2], 6)


def test_temperature_and_exact_combiner(members):
    ens = me([1.0, 3.0], temperature=0.5)
    x = [jax.random.normal(jax.random.key(i), (2, 24)) for i in range(2)]
    lp, _, _ = ens.exact_combiner().combine(x, ())
    ref = np.log(0.25 * jax.nn.softmax(x[0] / 0.5) + 0.75 * jax.nn.softmax(x[1] / 0.5))
    np.testing.assert_allclose(np.asarray(lp), ref, atol=1e-5)
    # temperature is a member temperature: greedy-equivalent at a tiny temperature
    dec = Decoder([members[0]], me(temperature=1e-3), Sampler(), cache_len=64)
    assert dec.generate([PROMPTS[0]], 5).tokens[0].tolist() == _greedy_ref(members[0], PROMPTS[0], 5)


@pytest.mark.no_typecheck
def test_validation(members):
    with pytest.raises(ValueError, match="weights must be finite, >= 0"):
        me([1.0, -1.0])
    with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
        me(max_pending=0)
    with pytest.raises(ValueError, match="ME temperature"):
        me(temperature=0)
    with pytest.raises(ValueError, match="prob_average combiner in the ordinary decode loop"):
        Decoder(members, me(), Sampler(greedy=True))
    with pytest.raises(ValueError, match="ME samples exactly"):
        Decoder(members, me(), Sampler(temperature=0.7))
    with pytest.raises(ValueError, match="ME never computes"):
        Decoder(members, me(), Sampler(), truncation=lambda lp, ls: jnp.ones(lp.shape, bool))
    assert MixtureEnsemble(max_pending=8).chunk_sizes == (1, 2, 3, 4, 6, 8)
    assert MixtureEnsemble(max_pending=6).chunk_sizes == (1, 2, 3, 4, 6)
    assert MixtureEnsemble(max_pending=16).chunk_sizes == (1, 2, 3, 4, 6, 8, 12, 16)
    assert MixtureEnsemble(max_pending=2).chunk_sizes == (1, 2)
    assert MixtureEnsemble(max_pending=1).chunk_sizes == (1,)
    assert hash(me([1, 2])) == hash(me(np.array([1.0, 2.0])))


def test_gemma3_sliding_window_members_catch_up():
    gemma3 = pytest.importorskip("jaxens.models.gemma3")
    from flax import nnx

    cfg = gemma3.Gemma3Config.tiny(max_len=128)  # sliding window 5: catch-up chunks cross it
    ms = [gemma3.Gemma3(cfg, rngs=nnx.Rngs(0)), gemma3.Gemma3(cfg, rngs=nnx.Rngs(1))]

    @jax.jit
    def full(tokens):  # cache-free reference: one right-padded sequence, causal, no left padding
        n = tokens.shape[0]
        return [m(tokens[None], jnp.arange(n)[None], m.init_cache(1, n), jnp.int32(0), jnp.ones((1, n), bool))[0][0]
                for m in ms]

    def ref(seq):
        t = np.zeros((64,), np.int32)
        t[: len(seq)] = seq
        return [np.asarray(l)[: len(seq)] for l in full(jnp.asarray(t))]

    prompts = [[5, 9, 2, 7, 1, 60, 3, 8], [3, 90]]
    dec = Decoder(ms, me([0.7, 0.3], max_pending=4, per_member_truncation=True), Sampler(greedy=True), cache_len=64)
    out = dec.generate(prompts, 14, seed=1, return_state=True)
    s = out.state
    tokens, pad, length = np.asarray(s.tokens), np.asarray(s.pad), int(s.length)
    for t in range(14):  # every step: one member's argmax explains every row
        refs = [ref(tokens[b, pad[b] : 16 + t].tolist()) for b in range(2)]
        assert any(all(int(np.argmax(refs[b][i][-1])) == tokens[b, 16 + t] for b in range(2)) for i in range(2)), t
    kv_mask = jnp.arange(tokens.shape[1])[None] >= jnp.asarray(pad)[:, None]
    for j, m in enumerate(ms):
        c = int(s.cached[j])
        pos = jnp.asarray(np.arange(c, length)[None] - pad[:, None], jnp.int32)
        logits, _ = m(jnp.asarray(tokens[:, c:length]), pos, s.caches[j], jnp.int32(c), kv_mask)
        for b in range(2):
            r = ref(tokens[b, pad[b] : length].tolist())[j]
            np.testing.assert_allclose(np.asarray(logits[b]), r[-(length - c) :], atol=2e-4)
