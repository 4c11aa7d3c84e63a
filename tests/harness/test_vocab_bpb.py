"""Bits per byte (jaxens.harness.bpb) for toy members with hand-built tokenizers."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM, reference_logits
from vocab_toys import byte_bpe, sp_bpe

from jaxens.harness.bpb import member_bits_per_byte, segment_log_probs, word_mixture_bits_per_byte
from jaxens.vocab import TokenizerView

TEXT = " the cat unbelievably dog, the dog the cat"


@pytest.fixture(scope="module")
def toys():
    va, vb = TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])
    ma = ToyLM(ToyConfig(vocab_size=va.vocab_size), seed=1)
    mb = ToyLM(ToyConfig(vocab_size=vb.vocab_size), seed=2)
    return (va, vb), (ma, mb)


def _manual_bits(model, view, text):
    ids = [view.eos_ids[0]] + view.encode(text)
    lp = np.asarray(jax.nn.log_softmax(reference_logits(model, ids), -1), np.float64)
    return -sum(lp[t, ids[t + 1]] for t in range(len(ids) - 1)) / np.log(2)


def test_member_bpb_matches_manual(toys):
    views, models = toys
    for v, m in zip(views, models):
        r = member_bits_per_byte(m, v, TEXT)
        assert r.num_bytes == len(TEXT.encode())
        assert abs(r.bits - _manual_bits(m, v, TEXT)) < 1e-3 * r.bits


def test_word_mixture_bounds_and_limits(toys):
    views, models = toys
    ens, members = word_mixture_bits_per_byte(models, views, TEXT)
    for i in range(2):
        single, _ = word_mixture_bits_per_byte(models, views, TEXT, weights=[1.0 if j == i else 0.0 for j in range(2)])
        assert abs(single.bits - members[i].bits) < 1e-6 * members[i].bits  # segments telescope
    # log sum_i w_i P_i(s) >= log w_i + log P_i(s) on every segment
    x = TEXT.encode()
    ids = [v.encode(TEXT) for v in views]
    bounds, _ = segment_log_probs([np.zeros(len(i)) for i in ids], ids, views, x)
    S = len(bounds) - 1
    assert S == TEXT.count(" ")  # every word is a segment here ("unbelievably" included)
    for r in members:
        assert ens.bits <= r.bits + S * np.log2(2) + 1e-9
    # ... and sum_i w_i P_i(s) <= max_i P_i(s): never better than the best member on each segment
    from jaxens.harness.bpb import member_token_nll

    res = [member_token_nll(m, v, TEXT) for m, v in zip(models, views)]
    _, seg = segment_log_probs([r[0] for r in res], [r[1] for r in res], views, x)
    assert ens.bits >= -seg.max(0).sum() / np.log(2) - 1e-9
    assert np.allclose(-seg.sum(1) / np.log(2), [r.bits for r in members])
