"""Real checkpoints from the zoo (SmolLM2-135M, Gemma 3 270M): logits and perplexity against
transformers' PyTorch models on the same dequantised weights, cached decoding, tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from jaxens.models.forward import full_logits, sequence_nll, token_nll

pytestmark = pytest.mark.models

PARITY_TOKENS = 256
PPL_TOKENS = 1024


def _torch_logits(tm, ids):
    import torch

    with torch.no_grad():
        return tm(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def _torch_token_nll(tm, ids, chunk=256):
    """Per-token NLL from one full forward pass, the head applied in chunks."""
    import torch

    with torch.no_grad():
        x = torch.tensor(np.asarray(ids)[None], dtype=torch.long)
        h = tm.model(x).last_hidden_state[0]
        out = []
        softcap = getattr(tm.config, "final_logit_softcapping", None)
        for i in range(0, h.shape[0] - 1, chunk):
            z = tm.lm_head(h[i:i + chunk][: h.shape[0] - 1 - i])
            if softcap:
                z = torch.tanh(z / softcap) * softcap
            lp = torch.log_softmax(z, -1)
            tgt = x[0, i + 1:i + 1 + lp.shape[0]]
            out.append(-lp.gather(1, tgt[:, None])[:, 0])
        return torch.cat(out).double().numpy()


@pytest.fixture(scope="session")
def smollm2_ids(smollm2_tokenizer, alice_text):
    return smollm2_tokenizer.encode(alice_text[:20000])[:PPL_TOKENS]


@pytest.fixture(scope="session")
def gemma3_ids(gemma3_tokenizer, alice_text):
    return gemma3_tokenizer.encode(alice_text[:20000])[:PPL_TOKENS]  # starts with <bos>


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_logits_match_pytorch(name, request):
    model = request.getfixturevalue(name)
    tm = request.getfixturevalue(name + "_torch")
    ids = request.getfixturevalue(name + "_ids")[:PARITY_TOKENS]
    want = _torch_logits(tm, ids)
    got = np.asarray(full_logits(model, np.asarray(ids)[None]))[0]
    err = np.abs(got - want).max()
    print(f"\n{name}: max |logits jaxens - torch| over {len(ids)} tokens = {err:.2e} (max |logit| {np.abs(want).max():.1f})")
    assert err <= 1e-3


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_perplexity_matches_pytorch(name, request):
    """1024 tokens of alice29.txt (longer than Gemma's 512-token window), scored through the cache
    in chunks of 256; per-token NLLs agree too (also past the window)."""
    model = request.getfixturevalue(name)
    tm = request.getfixturevalue(name + "_torch")
    ids = request.getfixturevalue(name + "_ids")
    assert len(ids) == PPL_TOKENS
    ref = _torch_token_nll(tm, ids)
    got = token_nll(model, ids, chunk=256)
    assert got.shape == ref.shape
    ppl, ppl_ref = np.exp(got.mean()), np.exp(ref.mean())
    err = np.abs(got - ref)
    print(f"\n{name}: perplexity jaxens {ppl:.4f} torch {ppl_ref:.4f} (rel diff {abs(ppl / ppl_ref - 1):.1e}); "
          f"per-token NLL max diff {err.max():.1e}, past token 512 {err[512:].max():.1e}")
    assert err.max() < 2e-3
    assert abs(ppl / ppl_ref - 1) < 1e-3
    assert 3 < ppl < 60  # a sane model on English prose (a broken tokenizer or rotary layout is far off)


def test_smollm2_cached_batch_decoding(smollm2, smollm2_ids):
    """Two rows of different lengths (left padding): prefill, then one token at a time == full pass."""
    import jax.numpy as jnp
    from flax import nnx

    t = 40
    toks = np.zeros((2, t), np.int32)
    toks[0] = smollm2_ids[:t]
    toks[1, 9:] = smollm2_ids[100:100 + t - 9]
    pad = np.ones((2, t), bool)
    pad[1, :9] = False
    full = np.asarray(full_logits(smollm2, toks, pad))
    s = t
    cache = smollm2.init_cache(2, s)
    pos = np.maximum(np.cumsum(pad, 1) - 1, 0).astype(np.int32)
    step = nnx.jit(lambda m, a, p, c, i, kv: m(a, p, c, i, kv))
    outs, start = [], 0
    for n in [16] + [1] * (t - 16):
        kv = pad & (np.arange(s) < start + n)[None]
        lg, cache = step(smollm2, jnp.asarray(toks[:, start:start + n]), jnp.asarray(pos[:, start:start + n]), cache,
                         jnp.int32(start), jnp.asarray(kv))
        outs.append(np.asarray(lg))
        start += n
    inc = np.concatenate(outs, 1)
    err = np.abs(inc[pad] - full[pad]).max()
    print(f"\nsmollm2 cached vs full: max abs diff {err:.2e}")
    assert err < 1e-4 * max(1.0, np.abs(full[pad]).max() / 10)


def test_gemma3_tokenizer(gemma3_tokenizer, corpus_texts):
    tok = gemma3_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" the cat", add_special_tokens=False)) == ["▁the", "▁cat"]
    assert tok.encode("Hi")[0] == tok.bos_token_id == 2
    for name, text in corpus_texts.items():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, name
    # byte fallback for characters outside the vocabulary, user-defined pieces matched whole
    for s in ["\U0001F9EC\u2603 mixed\tTabs\n\nand   spaces", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_smollm2_tokenizer(smollm2_tokenizer, corpus_texts):
    tok = smollm2_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode(" the cat")) == ["Ġthe", "Ġcat"]
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]  # smollm splits digits
    for name, text in corpus_texts.items():
        assert tok.decode(tok.encode(text)) == text, name
    assert tok.eos_token == "<|endoftext|>" or tok.eos_token_id == 2


def test_smollm2_tokenizer_matches_transformers_gguf(smollm2_tokenizer, alice_text):
    transformers = pytest.importorskip("transformers")
    from jaxens.harness import zoo

    path = zoo.fetch("smollm2-135m", progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert smollm2_tokenizer.encode(alice_text) == ref.encode(alice_text)


def test_gguf_rotary_unpermutation_matches_transformers(smollm2_dir):
    """The Q/K rows of the cached HF directory equal transformers' GGUF reverse permutation."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from jaxens.harness import zoo
    from jaxens.models.loading import read_safetensors

    hf = read_safetensors(smollm2_dir / "model.safetensors")
    reader = gguf.GGUFReader(str(zoo.fetch("smollm2-135m", progress=False)))
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for t in reader.tensors:
        if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight"):
            w = gguf.dequantize(t.data, t.tensor_type)
            want = proc.process(w, t.name).weights
            key = "q_proj" if "attn_q" in t.name else "k_proj"
            np.testing.assert_array_equal(hf[f"model.layers.3.self_attn.{key}.weight"], want)


# --- slow: the full text, the transformers GGUF loading path, the SentencePiece reference ---------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_full_alice_perplexity_matches_pytorch(name, request, alice_text):
    model = request.getfixturevalue(name)
    tm = request.getfixturevalue(name + "_torch")
    tok = request.getfixturevalue(name + "_tokenizer")
    ids = tok.encode(alice_text)
    window = 2048
    nll_j = nll_t = 0.0
    count = 0
    for i in range(0, len(ids) - 1, window):  # non-overlapping windows of 2048 tokens
        w = ids[i:i + window + 1]
        if len(w) < 2:
            break
        s, c = sequence_nll(model, w, chunk=512)
        nll_j += s
        nll_t += _torch_token_nll(tm, w).sum()
        count += c
    ppl, ppl_ref = np.exp(nll_j / count), np.exp(nll_t / count)
    print(f"\n{name}: full alice29 perplexity jaxens {ppl:.4f} torch {ppl_ref:.4f} over {count} tokens")
    assert abs(ppl / ppl_ref - 1) < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("zoo_name,name", [("smollm2-135m", "smollm2"), ("gemma3-270m", "gemma3")])
def test_logits_match_transformers_gguf_loader(zoo_name, name, request):
    """Independent check of the GGUF conversion: transformers' own GGUF loader as the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxens.harness import zoo
    from jaxens.models.gguf import load_gguf

    path = zoo.fetch(zoo_name, progress=False)
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    model = load_gguf(path, progress=False)
    ids = request.getfixturevalue(name + "_ids")[:PARITY_TOKENS]
    err = np.abs(np.asarray(full_logits(model, np.asarray(ids)[None]))[0] - _torch_logits(tm, ids)).max()
    print(f"\n{name}: GGUF path, max |logits diff| {err:.2e}")
    assert err <= 1e-3


@pytest.mark.slow
def test_gemma3_tokenizer_matches_sentencepiece(gemma3_tokenizer, corpus_texts):
    """Reference: the sentencepiece library on a BPE model proto built from the GGUF's pieces."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    from jaxens.harness import zoo
    from jaxens.models.gguf import read_metadata

    meta = read_metadata(zoo.fetch("gemma3-270m", progress=False), arrays=True)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 3, 2, 1
    proto.trainer_spec.pad_id = 0
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, False, True
    for t, ty, sc in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]):
        p = proto.pieces.add()
        p.piece = t.replace(" ", "▁") if ty == 4 else t  # sentencepiece matches user pieces after escaping
        p.score, p.type = float(sc), int(ty)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    for name, text in corpus_texts.items():
        assert gemma3_tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), name
