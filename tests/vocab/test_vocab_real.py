"""Cross-tokenizer ensembles of the real zoo members SmolLM2-135M (byte-level BPE) and
Gemma 3 270M (SentencePiece): alignment, every method end to end (batched, short), bits per byte."""

from __future__ import annotations

import pytest

from jaxens.sampling import Sampler
from jaxens.harness.bpb import word_mixture_bits_per_byte
from jaxens.vocab import SAFE, CrossDecoder, DeePEn, GaC, MECross, UniTE, align

pytestmark = pytest.mark.models

PROMPTS = ["Alice was beginning to get very tired of sitting by her sister on the bank, and",
           "The capital of France is"]


@pytest.fixture(scope="module")
def alignment(smollm2_tokenizer, gemma3_tokenizer):
    return align([smollm2_tokenizer, gemma3_tokenizer])


def test_real_alignment(alignment):
    va, vb = alignment.views
    assert (va.kind, vb.kind) == ("byte_level", "sentencepiece")
    assert alignment.num_anchors > 20000
    for s in (b" the", b" Alice", b"\n", b" cat"):
        assert s in alignment.anchor_strings
    text = " unbelievably grandiloquent"
    sa = [va.strings[i] for i in va.encode(text)]
    sb = [vb.strings[i] for i in vb.encode(text)]
    assert b"".join(sa) == b"".join(sb) == text.encode() and sa != sb


@pytest.mark.parametrize("name", ["gac", "unite", "deepen", "safe", "me"])
def test_real_methods_generate(name, smollm2, gemma3, smollm2_tokenizer, gemma3_tokenizer, alignment):
    method = {"gac": GaC(), "unite": UniTE(), "deepen": DeePEn(k=128, max_anchors=4096), "safe": SAFE(),
              "me": MECross(per_member_truncation=True)}[name]
    sampler = Sampler(top_p=0.9, temperature=0.7) if name == "me" else Sampler(greedy=True)
    dec = CrossDecoder([smollm2, gemma3], [smollm2_tokenizer, gemma3_tokenizer], method, sampler, alignment=alignment)
    out = dec.generate(PROMPTS, 12, seed=0)
    assert out.steps >= 1 and len(out.texts) == 2
    for t in out.texts:
        words = t.split()
        assert len(words) >= 2 and all(w.isprintable() for w in words), t
    if name != "me":
        assert "Paris" in out.texts[1], out.texts


def test_real_bits_per_byte(smollm2, gemma3, smollm2_tokenizer, gemma3_tokenizer, alice_text):
    text = alice_text[5000:6500]
    ens, (a, b) = word_mixture_bits_per_byte([smollm2, gemma3], [smollm2_tokenizer, gemma3_tokenizer], text)
    for r in (a, b, ens):
        assert 0.3 < r.bpb < 2.5
    assert ens.bpb < max(a.bpb, b.bpb)


def test_real_cli_cross_generate(capsys):
    from jaxens.cli import main

    rc = main(["generate", "--member", "smollm2-135m", "--member", "gemma3-270m", "--combiner", "gac", "--greedy",
               "--max-new-tokens", "6", "--prompt", "The capital of France is", "--prompt", "One, two, three,"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "### prompt 1" in out and "Paris" in out
