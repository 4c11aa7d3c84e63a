"""The compiled decode loop on toy members (and a small random Llama when available)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM, reference_logits

from jaxens.combiners.averaging import combine_logit_average, logit_average, prob_average
from jaxens.decode import COMBINERS, Decoder, make_combiner, register_combiner
from jaxens.combiners.mixture import me
from jaxens.sampling import Sampler

PROMPTS = [[5, 9, 2, 7, 1], [3], [11, 4, 4, 8, 30, 2, 6, 17, 9, 1, 40], [7, 7]]


@pytest.fixture(scope="module")
def members():
    return [ToyLM(ToyConfig(), seed=0), ToyLM(ToyConfig(), seed=1)]


@pytest.fixture(scope="module")
def greedy_single(members):
    return Decoder([members[0]], logit_average(), Sampler(greedy=True), cache_len=64)


@pytest.fixture(scope="module")
def greedy_pair(members):
    return Decoder(members, logit_average(jnp.array([0.7, 0.3])), Sampler(greedy=True), cache_len=64)


def ref_greedy(models, weights, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits = [jnp.asarray(reference_logits(m, seq)[-1:]) for m in models]
        lp, _ = combine_logit_average(logits, weights)
        seq.append(int(np.argmax(np.asarray(lp)[0])))
    return seq[len(prompt) :]


def test_greedy_single_member_equals_uncached_argmax(members, greedy_single):
    for p in PROMPTS[:3]:
        out = greedy_single.generate([p], 12)
        assert out.tokens.shape == (1, 12) and out.lengths.tolist() == [12] and out.steps == 12
        assert out.tokens[0].tolist() == ref_greedy([members[0]], None, p, 12)
        assert out.stats.nonfinite.tolist() == [0]


def test_batched_left_padding_equals_unbatched(members, greedy_pair):
    out = greedy_pair.generate(PROMPTS, 10)
    for b, p in enumerate(PROMPTS):
        one = greedy_pair.generate([p], 10)
        assert out.tokens[b].tolist() == one.tokens[0].tolist()
        assert out.tokens[b].tolist() == ref_greedy(members, jnp.array([0.7, 0.3]), p, 10)


def test_no_recompile_same_bucket_new_max_new_tokens(members):
    dec = Decoder(members, prob_average(), Sampler(top_k=5), cache_len=64)
    dec.generate([[1, 2, 3]], 5, seed=0)
    assert dec.num_traces == {"prefill": 1, "run": 1}
    dec.generate([[9, 8, 7, 6, 5, 4]], 17, seed=1)  # same bucket (16), same batch size
    out = dec.generate([[4, 4]], 3, seed=2, callback=lambda chunk: None, chunk_steps=2)  # streaming too
    assert dec.num_traces == {"prefill": 1, "run": 1}
    assert out.lengths.tolist() == [3]
    dec.generate([list(range(1, 20))], 5)  # a new bucket (32) re-traces the prefill only
    assert dec.num_traces == {"prefill": 2, "run": 1}


def test_auto_cache_len_buckets(members):
    dec = Decoder([members[0]], logit_average(), Sampler(greedy=True))
    dec.generate([[1, 2]], 5)
    dec.generate([[3, 2, 1]], 30)  # 16 + 30 <= 64: same cache bucket
    assert dec.num_traces == {"prefill": 1, "run": 1}


def test_streaming_matches_generate(members):
    dec = Decoder(members, prob_average(), Sampler(temperature=0.9), stop_tokens=(3,), cache_len=64)
    full = dec.generate(PROMPTS, 20, seed=7)
    chunks = []
    streamed = dec.generate(PROMPTS, 20, seed=7, callback=chunks.append, chunk_steps=3)
    np.testing.assert_array_equal(full.tokens, streamed.tokens)
    assert len(chunks) >= 2
    for b in range(len(PROMPTS)):
        text = sum((c[b] for c in chunks), [])
        assert text == full.tokens[b, : full.lengths[b]].tolist()
    it = list(dec.stream(PROMPTS, 20, seed=7, chunk_steps=5))
    assert [sum((c[b] for c in it), []) for b in range(len(PROMPTS))] == [
        full.tokens[b, : full.lengths[b]].tolist() for b in range(len(PROMPTS))
    ]


def test_stop_tokens_and_per_row_max_new(members, greedy_single):
    base = greedy_single.generate(PROMPTS[:3], 12)
    stop = int(base.tokens[0, 4])
    first = [next((i for i, t in enumerate(row) if t in (stop, 47)), None) for row in base.tokens.tolist()]
    dec = Decoder([members[0]], logit_average(), Sampler(greedy=True), stop_tokens=(stop, 47), pad_id=0, cache_len=64)
    out = dec.generate(PROMPTS[:3], 12)
    for b in range(3):
        if first[b] is None:
            assert out.lengths[b] == 12 and not out.finished[b]
        else:
            assert out.lengths[b] == first[b] and out.finished[b]
            assert out.tokens[b, first[b]] in (stop, 47)
            assert np.all(out.tokens[b, first[b] + 1 :] == 0)
        assert out.tokens[b, : out.lengths[b]].tolist() == base.tokens[b, : out.lengths[b]].tolist()
    per_row = greedy_single.generate(PROMPTS[:3], np.array([2, 0, 7]))
    assert per_row.lengths.tolist() == [2, 0, 7]
    assert per_row.tokens.shape == (3, 7)
    assert per_row.tokens[0, :2].tolist() == base.tokens[0, :2].tolist()
    assert np.all(per_row.tokens[1] == 0)


def test_sampling_is_seeded(members):
    dec = Decoder(members, prob_average(), Sampler(), cache_len=64)
    a = dec.generate(PROMPTS, 10, seed=3).tokens
    b = dec.generate(PROMPTS, 10, seed=3).tokens
    c = dec.generate(PROMPTS, 10, key=jax.random.key(4)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_truncation_hook(members):
    allowed = jnp.zeros((48,), bool).at[jnp.array([5, 6, 20])].set(True)

    def only_three(logp, member_logits):
        assert len(member_logits) == 2 and member_logits[0].shape == logp.shape
        return jnp.broadcast_to(allowed, logp.shape)

    dec = Decoder(members, prob_average(), Sampler(), truncation=only_three, cache_len=64)
    out = dec.generate(PROMPTS, 8)
    assert set(np.unique(out.tokens)) <= {5, 6, 20}


def test_combiner_stats_aggregation(members):
    from jaxens.combiners.base import Combiner, EmptyState

    def combine(logits, state):
        lp = jax.nn.log_softmax(logits[0], -1)
        B = lp.shape[0]
        info = {"flag": jnp.arange(B) % 2 == 0, "status": jnp.full((B,), 2, jnp.int32), "res": jnp.max(lp, -1)}
        return lp, state, info

    dec = Decoder(members, Combiner(lambda b: EmptyState(), combine), Sampler(greedy=True), cache_len=64)
    out = dec.generate(PROMPTS, np.array([4, 4, 6, 6]))
    assert out.stats["flag"].tolist() == [4, 0, 6, 0]
    assert out.stats["status"].shape == (4, 8)
    assert out.stats["status"][:, 2].tolist() == [4, 4, 6, 6] and out.stats["status"].sum() == 20
    assert np.all(out.stats["res"] <= 0) and np.all(np.isfinite(out.stats["res"]))


def test_errors(members):
    dec = Decoder([members[0]], logit_average(), Sampler(), cache_len=64)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dec.generate([[1], []], 3)
    with pytest.raises(ValueError, match="non-empty list"):
        dec.generate([], 3)
    with pytest.raises(ValueError, match="exceeds the members' context of 256"):
        dec.generate([[1] * 250], 10)
    with pytest.raises(ValueError, match="exceeds cache_len=64"):
        dec.generate([[1] * 40], 10)
    with pytest.raises(ValueError, match=r"outside \[0, 48\)"):
        dec.generate([[1, 48]], 3)
    big = ToyLM(ToyConfig(vocab_size=50), seed=2)
    with pytest.raises(ValueError, match=r"different vocabulary sizes \[48, 50\].*vocab_size=48"):
        Decoder([members[0], big], logit_average())
    Decoder([members[0], big], logit_average(), vocab_size=48)  # padded tables: explicit common vocabulary
    with pytest.raises(ValueError, match="ME samples exactly .* only with plain sampling"):
        Decoder(members, me(), Sampler(top_p=0.9))
    with pytest.raises(ValueError, match="ME has 3 weights"):
        Decoder(members, me([1, 1, 1]))
    with pytest.raises(ValueError, match="unknown combiner 'nope'; known combiners: .*logit_average"):
        make_combiner("nope", members)


def test_registry(members):
    assert {"logit_average", "prob_average", "me"} <= set(COMBINERS)
    c = make_combiner("prob_average", members, weights=[0.2, 0.8])
    lp, _, _ = c.combine([jnp.zeros((1, 48)), jnp.zeros((1, 48))], c.init(1))
    assert lp.shape == (1, 48)
    register_combiner("first_only", lambda ms, weights=None, temperature=1.0: logit_average(jnp.array([1.0, 0.0])))
    try:
        dec = Decoder(members, make_combiner("first_only", members), Sampler(greedy=True), cache_len=64)
        assert dec.generate([PROMPTS[0]], 6).tokens[0].tolist() == ref_greedy([members[0]], None, PROMPTS[0], 6)
    finally:
        COMBINERS.pop("first_only")


def test_llama_member_greedy_matches_full_forward():
    llama = pytest.importorskip("jaxens.models.llama")
    cfg = llama.LlamaConfig.tiny(max_len=128)
    m1 = llama.Llama(cfg, rngs=__import__("flax").nnx.Rngs(0))
    m2 = llama.Llama(cfg, rngs=__import__("flax").nnx.Rngs(1))
    prompts = [[5, 9, 2, 7, 1], [3, 90], [11, 4, 4, 8, 30, 2, 6, 17, 9]]
    dec = Decoder([m1, m2], logit_average(), Sampler(greedy=True), cache_len=64)
    out = dec.generate(prompts, 8)

    @jax.jit
    def full(tokens):  # right padding is invisible to the real (earlier) positions
        return [m(tokens[None], jnp.arange(32)[None], m.init_cache(1, 32), jnp.int32(0), jnp.ones((1, 32), bool))[0][0]
                for m in (m1, m2)]

    def logits_at_end(seq):
        t = np.zeros((32,), np.int32)
        t[: len(seq)] = seq
        return [l[len(seq) - 1][None] for l in full(jnp.asarray(t))]

    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(8):
            lp, _ = combine_logit_average(logits_at_end(seq))
            seq.append(int(np.argmax(np.asarray(lp)[0])))
        assert out.tokens[b].tolist() == seq[len(p) :]


@pytest.mark.models
@pytest.mark.slow
def test_smollm2_greedy_batched_matches_full_forward(smollm2, smollm2_tokenizer):
    """Real member: the left-padded batched loop equals the argmax of full forwards (right-padded)."""
    from jaxens.models.forward import full_logits

    tok = smollm2_tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("Once upon a time, in a small village,")]
    n = 8
    dec = Decoder([smollm2], logit_average(), Sampler(greedy=True), cache_len=64)
    out = dec.generate(prompts, n)
    for b, p in enumerate(prompts):
        seq = list(p)
        for _ in range(n):
            t = np.zeros((1, 32), np.int32)
            t[0, : len(seq)] = seq
            logits = np.asarray(full_logits(smollm2, jnp.asarray(t)))[0, len(seq) - 1]
            seq.append(int(np.argmax(logits)))
        assert out.tokens[b].tolist() == seq[len(p) :], tok.decode(out.tokens[b])


def test_bottleneck_kl_without_hard_constraints_equals_logit_average(members, greedy_pair):
    """KL to the logit average with no constraint is the logit average itself."""
    assert {f"bottleneck-{o}" for o in __import__("jaxens.objectives").objectives.OBJECTIVES} <= set(COMBINERS)
    comb = make_combiner("bottleneck-kl", members, weights=[0.7, 0.3], hard=())
    dec = Decoder(members, comb, Sampler(greedy=True), cache_len=64)
    out = dec.generate(PROMPTS, 10)
    np.testing.assert_array_equal(out.tokens, greedy_pair.generate(PROMPTS, 10).tokens)
    assert out.stats.status.shape == (len(PROMPTS), 8)
    assert out.stats.status.sum(axis=1).tolist() == out.lengths.tolist()
    with pytest.raises(ValueError, match="no member temperature"):
        make_combiner("bottleneck-kl", members, temperature=0.5)


def test_bottleneck_sum_ce_tiny_llamas_reports_statuses():
    from flax import nnx

    from jaxens.models.llama import Llama, LlamaConfig
    from jaxens.solvers.solution import Status

    cfg = LlamaConfig.tiny(max_len=128, d_model=32)  # v = 97 > 2 d + 1: the hard constraints are feasible
    ms = [Llama(cfg, rngs=nnx.Rngs(0)), Llama(cfg, rngs=nnx.Rngs(1))]
    comb = make_combiner("bottleneck-sum_ce", ms, hard="all")
    dec = Decoder(ms, comb, Sampler(greedy=True), cache_len=64)
    prompts = [[5, 9, 2, 7, 1], [3, 90]]
    out = dec.generate(prompts, 6)
    assert out.lengths.tolist() == [6, 6] and out.tokens.shape == (2, 6)
    hist = out.stats.status
    assert hist.shape == (2, 8) and hist.sum(axis=1).tolist() == [6, 6]
    assert hist[:, Status.SOLVED].sum() + hist[:, Status.MAX_ITERS].sum() == 12, hist
    assert np.all(np.isfinite(out.stats.primal_residual)) and np.all(out.stats.iterations >= 1)
    # the loop's first token is the argmax of the combiner applied to the members' prefill logits
    lp, _, _ = comb.combine(
        [m(jnp.asarray(prompts[:1]), jnp.arange(5)[None], m.init_cache(1, 8), jnp.int32(0), jnp.ones((1, 8), bool))[0][
            :, -1] for m in ms],
        comb.init(1),
    )
    assert int(np.argmax(np.asarray(lp)[0])) == out.tokens[0, 0]


@pytest.mark.no_typecheck  # checks Decoder's own message for a wrong `hooks`
def test_decode_hooks_place_params_constrain_state_and_check_batch(members, greedy_pair):
    from jaxens.decode import DecodeHooks

    dev = jax.devices()[0]
    seen = {"params": 0, "state": 0}

    def params(s):
        seen["params"] += 1
        return jax.device_put(s, dev)

    def state(s):
        seen["state"] += 1
        return s

    def batch(B):
        if B % 2:
            raise ValueError(f"batch of {B} rows is odd")

    hooks = DecodeHooks(params=params, state=state, batch=batch)
    dec = Decoder(members, logit_average(jnp.array([0.7, 0.3])), Sampler(greedy=True), cache_len=64, hooks=hooks)
    assert seen["params"] == len(members)
    out = dec.generate(PROMPTS, 10)
    assert seen["state"] >= 3  # prefill output, step input and output (traced once each)
    ref = greedy_pair.generate(PROMPTS, 10)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    with pytest.raises(ValueError, match="batch of 3 rows is odd"):
        dec.generate(PROMPTS[:3], 2)
    with pytest.raises(ValueError, match="hooks must be"):
        Decoder(members, logit_average(), hooks=(params,))
