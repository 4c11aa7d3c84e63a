"""Checkpoint loading: GGUF files written here in llama.cpp's conventions (permuted Q/K rows,
``1 + w`` Gemma norms, transposed GPT-2 projections, Q8_0 quantisation), HF directories, and the
errors for bad input (truncated GGUF, corrupt safetensors, pickles, config/weights mismatch)."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
from flax import nnx

from jaxens.models.forward import full_logits
from jaxens.models.gemma3 import Gemma3, Gemma3Config, params_to_hf as gemma_to_hf
from jaxens.models.gguf import load_gguf, read_metadata
from jaxens.models.gpt2 import GPT2, GPT2Config, params_to_hf as gpt2_to_hf
from jaxens.models.llama import Llama, LlamaConfig, params_to_hf as llama_to_hf
from jaxens.models.loading import load_hf_dir, read_safetensors, save_hf_dir


def _llamacpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {  # transformers suffix -> GGUF block tensor
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "ln_1": "attn_norm", "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}


def _gguf_name(arch, hf):
    stem, suffix = hf.rsplit(".", 1)
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    i = parts.index("layers") if "layers" in parts else parts.index("h")
    rest = ".".join(parts[i + 2:])
    if rest == "post_attention_layernorm":
        name = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        name = _GGUF_NAMES[rest]
    return f"blk.{parts[i + 1]}.{name}.{suffix}"


def write_gguf(path, arch, model, quantize=()):
    """Write ``model`` as llama.cpp would (the inverse of the conversions jaxens undoes)."""
    c = model.config
    if arch == "gpt2":
        hf = gpt2_to_hf(c, model.params_numpy())
    elif arch == "gemma3":
        hf = gemma_to_hf(c, model.params_numpy())
    else:
        hf = llama_to_hf(c, model.params_numpy())
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        meta = {"block_count": c.n_layers, "embedding_length": c.d_model, "context_length": c.max_len,
                "feed_forward_length": c.d_ff, "attention.head_count": c.n_heads}
        w.add_float32("gpt2.attention.layer_norm_epsilon", c.ln_eps)
    else:
        meta = {"block_count": c.n_layers, "embedding_length": c.d_model, "context_length": c.max_len,
                "feed_forward_length": c.d_ff, "attention.head_count": c.n_heads,
                "attention.head_count_kv": c.n_kv_heads, "attention.key_length": c.head_dim,
                "attention.value_length": c.head_dim}
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_eps)
        if arch == "gemma3":
            meta["attention.sliding_window"] = c.sliding_window
            w.add_float32("gemma3.rope.freq_base", c.rope_global_base)
        else:
            w.add_float32(f"{arch}.rope.freq_base", c.rope_theta)
    for k, v in meta.items():
        w.add_uint32(f"{arch}.{k}", int(v))
    w.add_uint32(f"{arch}.vocab_size", c.vocab_size)
    for name, t in hf.items():
        t = np.asarray(t, np.float32)
        g = _gguf_name(arch, name)
        if arch == "llama" and g.endswith("attn_q.weight"):
            t = _llamacpp_permute(t, c.n_heads)
        elif arch == "llama" and g.endswith("attn_k.weight"):
            t = _llamacpp_permute(t, c.n_kv_heads)
        elif arch == "gemma3" and g.endswith("norm.weight"):
            t = t + 1.0
        elif arch == "gpt2" and t.ndim == 2 and ("attn_" in g or "ffn_" in g):
            t = t.T
        t = np.ascontiguousarray(t)
        if g in quantize:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MODELS = {
    "llama": lambda: Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0)),
    "llama_untied": lambda: Llama(LlamaConfig.tiny(tie_embeddings=False, n_kv_heads=1), rngs=nnx.Rngs(1)),
    "qwen2": lambda: Llama(LlamaConfig.tiny(qkv_bias=True, model_type="qwen2"), rngs=nnx.Rngs(2)),
    "gemma3": lambda: Gemma3(Gemma3Config.tiny(n_layers=6, layer_types=None, final_logit_softcap=None,
                                               sliding_window=4), rngs=nnx.Rngs(3)),
    "gpt2": lambda: GPT2(GPT2Config.tiny(), rngs=nnx.Rngs(4)),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gguf_round_trip(kind, tmp_path):
    model = MODELS[kind]()
    arch = {"llama_untied": "llama"}.get(kind, kind)
    path = write_gguf(tmp_path / "m.gguf", arch, model)
    loaded = load_gguf(path, progress=False)
    eps = "ln_eps" if kind == "gpt2" else "rms_eps"  # GGUF stores it as float32
    assert getattr(loaded.config, eps) == pytest.approx(getattr(model.config, eps), rel=1e-6)
    assert dataclasses.replace(loaded.config, **{eps: getattr(model.config, eps)}) == model.config
    for k, v in model.params_numpy().items():
        np.testing.assert_allclose(loaded.params_numpy()[k], v, atol=1e-6, err_msg=k)
    toks = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 10))
    np.testing.assert_allclose(np.asarray(full_logits(loaded, toks)), np.asarray(full_logits(model, toks)), atol=1e-5)


def test_gguf_quantised_tensor_is_dequantised(tmp_path):
    model = MODELS["llama"]()
    path = write_gguf(tmp_path / "q.gguf", "llama", model, quantize=("blk.0.ffn_up.weight", "blk.1.attn_q.weight"))
    loaded = load_gguf(path, progress=False)
    for k in ("layers/w_up", "layers/wq"):
        a, b = loaded.params_numpy()[k], model.params_numpy()[k]
        err = np.abs(a - b).max()
        assert 0 < err < 0.01 * np.abs(b).max()  # Q8_0: close, not exact
    assert read_metadata(path)["general.architecture"] == "llama"


def test_truncated_and_garbage_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "llama", MODELS["llama"]())
    data = path.read_bytes()
    for cut in (len(data) // 2, 40, 3):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or not a GGUF"):
            load_gguf(bad, progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="truncated or not a GGUF"):
        load_gguf(junk, progress=False)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "missing.gguf")


def test_corrupt_safetensors(tmp_path):
    save_hf_dir(MODELS["gpt2"](), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a valid safetensors"):
        load_hf_dir(tmp_path)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        read_safetensors(f)


def test_pickle_checkpoints_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="safetensors"):
        load_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_hf_dir(tmp_path / "pytorch_model.bin")
    for suffix in (".pt", ".pth"):
        p = tmp_path / f"model{suffix}"
        p.write_bytes(b"\x80\x04")
        with pytest.raises(ValueError, match="save_pretrained"):
            load_gguf(p)
        with pytest.raises(ValueError, match="pickle"):
            read_safetensors(p)


def test_config_weights_mismatch_names_tensor_and_shapes(tmp_path):
    save_hf_dir(MODELS["llama"](), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight.*\(100, 64\).*\(96, 64\)"):
        load_hf_dir(tmp_path)
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit the config"):
        load_hf_dir(tmp_path)
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.2"):
        load_hf_dir(tmp_path)
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported model_type 'mamba'"):
        load_hf_dir(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_dir(tmp_path)


def test_sharded_safetensors_and_bf16(tmp_path):
    from safetensors.numpy import save_file
    import ml_dtypes

    model = MODELS["llama"]()
    save_hf_dir(model, tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    half = {n: tensors[n].astype(ml_dtypes.bfloat16) for n in names[: len(names) // 2]}
    rest = {n: tensors[n] for n in names[len(names) // 2:]}
    save_file(half, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(rest, str(tmp_path / "model-00002-of-00002.safetensors"))
    wm = {n: "model-00001-of-00002.safetensors" for n in half} | {n: "model-00002-of-00002.safetensors" for n in rest}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    loaded = load_hf_dir(tmp_path, dtype="bfloat16")
    assert loaded.config.dtype == "bfloat16"
    assert loaded.embed[...].dtype.name == "bfloat16"
