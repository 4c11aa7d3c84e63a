"""Member families on small random weights: PyTorch parity through a Hugging Face directory,
cached incremental decoding with left padding, configs and dtypes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxens.models.forward import full_logits
from jaxens.models.gemma3 import Gemma3, Gemma3Config
from jaxens.models.gpt2 import GPT2, GPT2Config
from jaxens.models.llama import Llama, LlamaConfig
from jaxens.models.loading import load_hf_dir, save_hf_dir

FAMILIES = {
    "llama": lambda **kw: Llama(LlamaConfig.tiny(**kw), rngs=nnx.Rngs(1)),
    "llama_untied": lambda **kw: Llama(LlamaConfig.tiny(tie_embeddings=False, **kw), rngs=nnx.Rngs(2)),
    "llama3_rope": lambda **kw: Llama(LlamaConfig.tiny(rope_scaling=(8.0, 1.0, 4.0, 16), rope_theta=500000.0, **kw),
                                      rngs=nnx.Rngs(3)),
    "qwen2": lambda **kw: Llama(LlamaConfig.tiny(qkv_bias=True, model_type="qwen2", n_kv_heads=1, **kw),
                                rngs=nnx.Rngs(4)),
    "gemma3": lambda **kw: Gemma3(Gemma3Config.tiny(**kw), rngs=nnx.Rngs(5)),
    "gemma3_nocap": lambda **kw: Gemma3(Gemma3Config.tiny(final_logit_softcap=None, rope_global_scale=4.0, **kw),
                                        rngs=nnx.Rngs(6)),
    "gpt2": lambda **kw: GPT2(GPT2Config.tiny(**kw), rngs=nnx.Rngs(7)),
}


def _tokens(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_torch_parity_through_hf_dir(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = FAMILIES[family]()
    save_hf_dir(model, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    toks = _tokens(model.config.vocab_size, (2, 24))
    with torch.no_grad():
        want = ref(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    got = np.asarray(full_logits(model, toks))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # and the directory loads back to the same member
    again = load_hf_dir(tmp_path)
    assert again.config == model.config
    for k, v in model.params_numpy().items():
        np.testing.assert_array_equal(again.params_numpy()[k], v)


def _incremental(model, tokens, pad_mask, prefill):
    """Prefill ``prefill`` slots, then one token per call through the cache."""
    b, t = tokens.shape
    s = t + 3
    cache = model.init_cache(b, s)
    pos = np.maximum(np.cumsum(pad_mask, 1) - 1, 0).astype(np.int32)
    real = np.zeros((b, s), bool)
    real[:, :t] = pad_mask
    step = nnx.jit(lambda m, tok, p, c, i, kv: m(tok, p, c, i, kv))
    outs = []
    start = 0
    for n in [prefill] + [1] * (t - prefill):
        kv = real & (np.arange(s) < start + n)[None]
        logits, cache = step(model, jnp.asarray(tokens[:, start:start + n]), jnp.asarray(pos[:, start:start + n]),
                             cache, jnp.int32(start), jnp.asarray(kv))
        outs.append(np.asarray(logits))
        start += n
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_cached_decoding_matches_full_forward(family):
    model = FAMILIES[family]()
    t = 14
    toks = _tokens(model.config.vocab_size, (2, t), seed=1)
    pad_mask = np.ones((2, t), bool)
    pad_mask[1, :5] = False  # row 1 is 5 tokens shorter, left-padded
    toks[1, :5] = 0
    full = np.asarray(full_logits(model, toks, pad_mask))
    inc = _incremental(model, toks, pad_mask, prefill=6)
    np.testing.assert_allclose(inc[pad_mask], full[pad_mask], atol=1e-4, rtol=0)
    # the short row equals the same sequence run alone without padding
    alone = np.asarray(full_logits(model, toks[1:, 5:]))
    np.testing.assert_allclose(full[1, 5:], alone[0], atol=1e-4, rtol=0)
    assert np.isfinite(inc).all()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_bfloat16_close_to_float32(family):
    m32 = FAMILIES[family]()
    m16 = type(m32)(type(m32.config)(**{**m32.config.__dict__, "dtype": "bfloat16"}), m32.params_numpy())
    toks = _tokens(m32.config.vocab_size, (1, 12))
    a, b = np.asarray(full_logits(m32, toks)), np.asarray(full_logits(m16, toks))
    assert b.dtype == np.float32 and m16.init_cache(1, 4).k.dtype == jnp.bfloat16
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05


def test_unembedding_gives_the_logits():
    for family in ("llama", "llama_untied", "gpt2", "gemma3_nocap"):
        model = FAMILIES[family]()
        w, b = model.unembedding()
        assert w.shape == (model.config.vocab_size, model.config.d_model) and b is None
    model = FAMILIES["llama_untied"]()
    assert not np.allclose(np.asarray(model.unembedding()[0]), np.asarray(model.embed[...]))


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig.tiny(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        LlamaConfig.tiny(dtype="float16")
    with pytest.raises(ValueError, match="layer_types"):
        Gemma3Config.tiny(layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="d_model"):
        GPT2Config.tiny(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size > 0"):
        GPT2Config.tiny(vocab_size=0)
    assert LlamaConfig.smollm2_135m().head_dim == 64
    assert Gemma3Config.gemma3_270m().layer_types.count("full_attention") == 3
    cfg = Gemma3Config.gemma3_270m()
    assert Gemma3Config.from_hf(cfg.to_hf()) == cfg
    cfg = LlamaConfig.llama3_2_1b()
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


def test_bad_call_shapes_raise():
    model = FAMILIES["llama"]()
    toks = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="cache"):
        model(toks, toks, model.init_cache(1, 8), jnp.int32(0), jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match="do not fit"):
        model(toks, toks, model.init_cache(2, 3), jnp.int32(0), jnp.ones((2, 3), bool))
    with pytest.raises(ValueError, match="kv_mask"):
        model(toks, toks, model.init_cache(2, 8), jnp.int32(0), jnp.ones((2, 7), bool))


def test_no_recompile_for_same_shapes():
    model = FAMILIES["gemma3"]()
    step = nnx.jit(lambda m, tok, p, c, i, kv: m(tok, p, c, i, kv))
    cache = model.init_cache(1, 8)
    kv = jnp.ones((1, 8), bool)
    for i in range(3):
        _, cache = step(model, jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), i), cache, jnp.int32(i), kv)
    with jax.log_compiles(True):
        import logging

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("jax").addHandler(handler)
        try:
            step(model, jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), 5), cache, jnp.int32(5), kv)
        finally:
            logging.getLogger("jax").removeHandler(handler)
    assert not [r for r in records if "Compiling" in r.getMessage()]


def test_hf_config_json_round_trip(tmp_path):
    model = FAMILIES["qwen2"]()
    save_hf_dir(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["tie_word_embeddings"] is True
