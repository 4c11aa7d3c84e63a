"""SAFE with block verification (jaxens.vocab.safe): the drafter drafts ``verify_block`` tokens,
each verifier scores them in one chunked forward, tokens are accepted up to the first ensembled
position.  Reference: the step-by-step variant (``verify_block=1``), which consults the verifiers
at every position; with greedy sampling both must write the same text and count the same
candidate / consulted / ensembled positions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM
from vocab_toys import byte_bpe, sp_bpe

from jaxens.sampling import Sampler
from jaxens.vocab import SAFE, CrossDecoder, TokenizerView, align

PROMPTS = ["the cat", " dog the", "un"]
COUNTS = ("positions", "candidates", "consulted", "ensembled")


def _toy(view, seed):
    """A random toy member that writes lowercase words (other tokens get a -30 bias, tokens that
    start a word +2), so that word boundaries, and so SAFE's candidate positions, are common."""
    m = ToyLM(ToyConfig(vocab_size=view.vocab_size, max_position_embeddings=512), seed=seed)
    ok = np.array([s is not None and len(s) > 0 and all(97 <= c <= 122 or c == 32 for c in s) for s in view.strings])
    word = np.array([s is not None and len(s) > 1 and s[0] == 32 for s in view.strings])
    m.bias[...] = jnp.asarray(np.asarray(m.bias[...]) + np.where(ok, 0.0, -30.0) + np.where(word, 2.0, 0.0),
                              jnp.float32)
    return m


@pytest.fixture(scope="module")
def setup():
    va, vb = TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])
    al = align([va, vb])
    return al, (_toy(va, 1), _toy(vb, 2))


def _run(setup, prompts, n, **kw):
    al, models = setup
    dec = CrossDecoder(models, list(al.views), SAFE(**kw), Sampler(greedy=True), alignment=al)
    return dec, dec.generate(prompts, n)


@pytest.mark.parametrize("drafter,confidence,disagreement,blocks", [(0, 0.9, 0.3, (2, 5)), (0, 1.0, 0.95, (4,)),
                                                                   (1, 1.0, 0.9, (3,))])
def test_block_matches_stepwise_greedy(setup, drafter, confidence, disagreement, blocks):
    kw = dict(drafter=drafter, confidence=confidence, disagreement=disagreement)
    _, ref = _run(setup, PROMPTS, 16, verify_block=1, **kw)
    v = 1 - drafter
    assert 0 < ref.stats["ensembled"] <= ref.stats["consulted"] <= ref.stats["candidates"] < ref.stats["positions"]
    for K in blocks:
        _, got = _run(setup, PROMPTS, 16, verify_block=K, **kw)
        assert got.texts == ref.texts, (K, got.texts, ref.texts)
        assert {k: got.stats[k] for k in COUNTS} == {k: ref.stats[k] for k in COUNTS}
        # whole blocks are verified at once: never more verifier forwards than the stepwise form
        assert got.stats["forward_calls"][v] <= ref.stats["forward_calls"][v]
        assert got.stats["rounds"] < ref.stats["rounds"] == ref.steps


def test_block_single_row_and_caches(setup):
    """Batch of one; afterwards every member's cache mask holds exactly its current tokens (the
    dropped drafts were retracted)."""
    kw = dict(confidence=1.0, disagreement=0.9)
    _, ref = _run(setup, ["the cat"], 20, verify_block=1, **kw)
    dec, got = _run(setup, ["the cat"], 20, verify_block=4, **kw)
    assert got.texts == ref.texts
    assert got.stats["ensembled"] == ref.stats["ensembled"] > 0


def test_confident_drafter_never_runs_verifier(setup):
    """With the pre-gate at its minimum no position is consulted: the verifier runs only on the prompt."""
    _, got = _run(setup, PROMPTS, 10, verify_block=4, confidence=1e-9)
    assert got.stats["consulted"] == got.stats["ensembled"] == 0
    assert got.stats["forward_calls"][1] == 1
    _, ref = _run(setup, PROMPTS, 10, verify_block=1, confidence=1e-9)
    assert got.texts == ref.texts


def test_bad_verify_block(setup):
    with pytest.raises(ValueError, match="verify_block"):
        _run(setup, ["a"], 1, verify_block=0)


@pytest.mark.models
@pytest.mark.slow
def test_real_pair_block_matches_stepwise(smollm2, gemma3, smollm2_tokenizer, gemma3_tokenizer):
    al = align([smollm2_tokenizer, gemma3_tokenizer])
    outs = {}
    for K in (1, 4):
        dec = CrossDecoder([smollm2, gemma3], [smollm2_tokenizer, gemma3_tokenizer],
                           SAFE(confidence=0.6, disagreement=0.3, verify_block=K), Sampler(greedy=True), alignment=al)
        outs[K] = dec.generate(["Alice was beginning to get very tired of sitting by her sister on the bank, and"], 16)
    assert outs[4].texts == outs[1].texts, (outs[4].texts, outs[1].texts)
    assert outs[4].stats["ensembled"] == outs[1].stats["ensembled"] > 0
    assert outs[4].stats["forward_calls"][1] <= outs[1].stats["forward_calls"][1]
    assert outs[4].stats["rounds"] < outs[1].stats["rounds"]
