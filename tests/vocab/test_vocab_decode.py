"""The cross-tokenizer decode loop and its methods on toy members with hand-built tokenizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM, reference_logits
from vocab_toys import byte_bpe, sp_bpe

from jaxens.sampling import Sampler
from jaxens.vocab import (
    SAFE,
    CrossDecoder,
    DeePEn,
    GaC,
    MECross,
    TokenizerView,
    UniTE,
    align,
    gac_combine,
    unite_combine,
)
from jaxens.vocab.cross_decode import _Forward, _Stream
from jaxens.vocab.safe import sharpen

TEXT = " the cat unbelievably dog, the dog é the cat"


@pytest.fixture(scope="module")
def setup():
    va, vb = TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])
    al = align([va, vb])
    ma = ToyLM(ToyConfig(vocab_size=va.vocab_size, max_position_embeddings=512), seed=1)
    mb = ToyLM(ToyConfig(vocab_size=vb.vocab_size, max_position_embeddings=512), seed=2)
    return al, (ma, mb)


@pytest.mark.parametrize("which", [0, 1])
def test_stream_cache_matches_uncached_reference(setup, which):
    """Pieces that split words force retractions; the cached log-probs must equal a fresh forward
    over the member's current tokens (prompt + re-encoded text) for every row."""
    al, models = setup
    view, model = al.views[which], models[which]
    st = _Stream(_Forward(model, view.vocab_size), view)
    prompts = ["the cat", " dog dog the"]
    st.start(prompts, reserve=8)  # small: the cache has to grow
    texts = [b"", b""]
    rng = np.random.default_rng(which)
    full = [TEXT.encode(), TEXT[::-1].encode()[2:]]  # row 1: reversed text (é bytes swapped: invalid UTF-8 tails)
    k = [0, 0]
    for _ in range(10):
        for b in range(2):
            k[b] = min(len(full[b]), k[b] + int(rng.integers(1, 5)))
            texts[b] = full[b][: k[b]]
        st.sync(texts)
        for b in range(2):
            seq = st.prompt_ids[b] + st.gen_ids[b]
            ref = jax.nn.log_softmax(jnp.asarray(reference_logits(model, seq)[-1]))
            np.testing.assert_allclose(np.asarray(st.logp[b]), np.asarray(ref), atol=2e-4)
    assert st.gen_ids[0] == view.encode(TEXT[: k[0]]) or view.token_bytes(st.gen_ids[0]) == full[0][: k[0]]
    assert st.kv_mask.sum() == sum(len(st.prompt_ids[b]) + len(st.gen_ids[b]) for b in range(2))


def _ref_gac(lps, al, w):
    U = al.union_size
    p = np.zeros((lps[0].shape[0], U))
    for i, lp in enumerate(lps):
        for j in range(lp.shape[1]):
            u = al.to_union[i][j]
            if u >= 0:
                p[:, u] += w[i] * np.exp(lp[:, j])
    return p / p.sum(1, keepdims=True)


def test_gac_matches_loop_reference(setup):
    al, _ = setup
    rng = np.random.default_rng(0)
    lps = [np.array(jax.nn.log_softmax(jnp.asarray(2 * rng.normal(size=(3, v.vocab_size))), -1)) for v in al.views]
    w = np.array([0.3, 0.7])
    got, ens = gac_combine([jnp.asarray(x) for x in lps], [jnp.asarray(m) for m in al.to_union], jnp.asarray(w),
                           al.union_size)
    np.testing.assert_allclose(np.exp(np.asarray(got)), _ref_gac(lps, al, w), atol=1e-6)
    assert np.all(np.asarray(ens))
    # gate: a confident main member is used alone
    lps[0][0] = np.log(np.full(lps[0].shape[1], 1e-6))
    lps[0][0, 40] = 0.0
    got, ens = gac_combine([jnp.asarray(x) for x in lps], [jnp.asarray(m) for m in al.to_union], jnp.asarray(w),
                           al.union_size, gate=0.9)
    assert not bool(ens[0]) and bool(ens[1])
    assert int(np.argmax(np.asarray(got[0]))) == al.to_union[0][40]


def test_unite_matches_reference(setup):
    al, _ = setup
    rng = np.random.default_rng(1)
    lps = [np.asarray(jax.nn.log_softmax(jnp.asarray(3 * rng.normal(size=(2, v.vocab_size))), -1)) for v in al.views]
    w = np.array([0.5, 0.5])
    k = 5
    got = np.exp(np.asarray(unite_combine([jnp.asarray(x) for x in lps], [jnp.asarray(m) for m in al.to_union],
                                          [jnp.asarray(f) for f in al.first_sub], jnp.asarray(w), k)))
    for b in range(2):
        cand = set()
        for i, lp in enumerate(lps):
            for j in np.argsort(-lp[b])[:k]:
                if al.to_union[i][j] >= 0:
                    cand.add(int(al.to_union[i][j]))
        score = {}
        for u in cand:
            s = al.union_strings[u]
            tot = 0.0
            for i, v in enumerate(al.views):
                # first sub-token by brute force: longest prefix of s in member i's strings
                if s is None:
                    j = v.eos_ids[0]
                else:
                    j = max((jj for jj, t in enumerate(v.strings) if t and s.startswith(t)),
                            key=lambda jj: (len(v.strings[jj]), -jj))
                tot += w[i] * np.exp(lps[i][b, j])
            score[u] = tot
        z = sum(score.values())
        assert set(np.nonzero(got[b] > 0)[0].tolist()) == cand
        for u, s in score.items():
            assert abs(got[b, u] - s / z) < 1e-5


def test_sharpen_groups_same_word():
    p = np.array([0.4, 0.3, 0.2, 0.1])
    out = sharpen(p, [b" Ali", b" Alice", b" Bob", b" Al"])
    np.testing.assert_allclose(out, [0.8, 0.0, 0.2, 0.0])
    np.testing.assert_allclose(sharpen(p, [None, b"a", b" ", b" b"]), p)


@pytest.mark.parametrize("method", ["gac", "unite", "deepen", "me", "safe"])
def test_methods_generate_batched(setup, method):
    al, models = setup
    meth = {"gac": GaC(), "unite": UniTE(k=4), "deepen": DeePEn(k=32, scale=20.0, max_anchors=64),
            "me": MECross(weights=(0.5, 0.5), per_member_truncation=True), "safe": SAFE(confidence=0.99, disagreement=0.0)}[method]
    dec = CrossDecoder(models, list(al.views), meth, Sampler(top_k=20), alignment=al)
    out = dec.generate(["the cat", " dog"], 6, seed=3)
    assert len(out.texts) == 2 and out.steps <= 6
    st = out.stats
    assert st["positions"] >= 1
    if method == "safe":
        assert 0 <= st["ensembled"] <= st["consulted"] <= st["candidates"] <= st["positions"]
    # a second call reuses the compiled forwards (no new traces for the same shapes)
    traces = [f.traces for f in dec.fwds]
    dec.generate(["the cat", " dog"], 6, seed=3)
    assert [f.traces for f in dec.fwds] == traces


def test_greedy_single_member_weight_reproduces_member(setup):
    """GaC with all weight on member 0 and greedy sampling writes member 0's own greedy text."""
    al, models = setup
    va = al.views[0]
    dec = CrossDecoder(models, list(al.views), GaC(weights=(1.0, 0.0)), Sampler(greedy=True), alignment=al)
    out = dec.generate(["the cat"], 5)
    ids = va.encode("the cat")
    text = b""
    for _ in range(5):
        lg = reference_logits(models[0], ids)[-1]
        lg = np.where([s is not None and len(s) > 0 or j in va.eos_ids for j, s in enumerate(va.strings)], lg, -np.inf)
        j = int(np.argmax(lg))
        if j in va.eos_ids:
            break
        text += va.strings[j]
        ids = va.encode("the cat") + va.encode(text.decode("utf-8", "ignore"))
    assert out.texts[0].encode() == text or out.texts[0] == text.decode("utf-8", "replace")


def test_bad_member_vocab(setup):
    al, models = setup
    small = ToyLM(ToyConfig(vocab_size=al.views[1].vocab_size - 5), seed=3)
    with pytest.raises(ValueError, match="embedding rows"):
        CrossDecoder([models[0], small], list(al.views), GaC(), alignment=al)
    with pytest.raises(ValueError, match="weights"):
        CrossDecoder(models, list(al.views), GaC(weights=(1.0,)), alignment=al).generate(["a"], 1)


def test_me_cross_refuses_truncation_unless_per_member(setup):
    """One ME rule for one vocabulary and across tokenizers: truncation only with per_member_truncation."""
    al, models = setup
    with pytest.raises(ValueError, match="per_member_truncation=True"):
        CrossDecoder(models, list(al.views), MECross(), Sampler(top_p=0.9), alignment=al).generate(["the cat"], 2)
    out = CrossDecoder(models, list(al.views), MECross(), Sampler(temperature=0.7), alignment=al).generate(
        ["the cat"], 2, seed=0)  # temperature applies to every member: exact, accepted
    assert out.steps >= 1
