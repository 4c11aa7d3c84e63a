"""The loaders never hold two copies of a member's weights.

A random-weight Qwen2-shaped GGUF (``gguf.GGUFWriter``, Q8_0 matrices and float32 norms, as
llama.cpp writes them) and a safetensors directory (bf16 on disk, float32 member) are loaded
under ``tracemalloc``.  numpy reports its data buffers to ``tracemalloc``, and the loader hands
64-byte-aligned buffers to jax, which adopts them on the CPU without copying (checked below), so
the traced peak is the loader's true peak.  It must stay at most 1.3x the member's weight bytes
(the read chunks are shrunk to 32 KiB so that, as at real sizes, a chunk is small beside a tensor);
the eager path (dequantise everything, stack, copy into the module) is seen above 1.6x on the same
file (about 1.8x traced, plus its untraced jax copy), which shows the measurement sees a second copy.
"""

from __future__ import annotations

import json
import tracemalloc

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxens.models.forward import full_logits
from jaxens.models.gguf import gguf_to_hf, load_gguf
from jaxens.models.llama import LlamaConfig
from jaxens.models.loading import load_hf_dir, model_from_hf_tensors

CFG = dict(vocab_size=2048, d_model=128, n_layers=12, n_heads=4, n_kv_heads=2, d_ff=256, qkv_bias=True,
           model_type="qwen2", tie_embeddings=False)


def _hf_tensors(c: LlamaConfig, rng) -> dict[str, np.ndarray]:
    """Random transformers-named float32 tensors of a Qwen2-like config (Linear weights [out, in])."""
    d, H = c.d_model, c.head_dim
    out = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (c.n_heads * H, d), p + "self_attn.q_proj.bias": (c.n_heads * H,),
            p + "self_attn.k_proj.weight": (c.n_kv_heads * H, d), p + "self_attn.k_proj.bias": (c.n_kv_heads * H,),
            p + "self_attn.v_proj.weight": (c.n_kv_heads * H, d), p + "self_attn.v_proj.bias": (c.n_kv_heads * H,),
            p + "self_attn.o_proj.weight": (d, c.n_heads * H), p + "mlp.gate_proj.weight": (c.d_ff, d),
            p + "mlp.up_proj.weight": (c.d_ff, d), p + "mlp.down_proj.weight": (d, c.d_ff),
        })
    return {k: (1.0 + 0.1 * rng.standard_normal(s) if k.endswith("norm.weight") else 0.05 * rng.standard_normal(s))
            .astype(np.float32) for k, s in out.items()}


_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _write_gguf(path, c: LlamaConfig, hf: dict[str, np.ndarray]) -> None:
    w = gguf.GGUFWriter(str(path), "qwen2")
    for k, v in {"block_count": c.n_layers, "embedding_length": c.d_model, "context_length": c.max_len,
                 "feed_forward_length": c.d_ff, "attention.head_count": c.n_heads,
                 "attention.head_count_kv": c.n_kv_heads, "vocab_size": c.vocab_size}.items():
        w.add_uint32(f"qwen2.{k}", v)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", c.rms_eps)
    w.add_float32("qwen2.rope.freq_base", c.rope_theta)
    for name, t in hf.items():
        stem, suffix = name.rsplit(".", 1)
        g = _TOP.get(stem) or f"blk.{stem.split('.')[2]}.{_GGUF['.'.join(stem.split('.')[3:])]}"
        if t.ndim == 2:
            w.add_tensor(f"{g}.{suffix}", gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(f"{g}.{suffix}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    c = LlamaConfig(**CFG)
    hf = _hf_tensors(c, np.random.default_rng(0))
    _write_gguf(root / "m.gguf", c, hf)
    (root / "hf").mkdir()
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in hf.items()}, str(root / "hf" / "model.safetensors"))
    (root / "hf" / "config.json").write_text(json.dumps(c.to_hf()))
    weight_bytes = sum(int(np.prod(s)) * 4 for s in c.param_shapes().values())
    return root, c, weight_bytes


def _traced_peak(fn):
    """``(result, peak traced bytes above the start)`` of ``fn()``."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _member_bytes(model) -> int:
    from flax import nnx

    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_loader_peak_is_one_copy(files, fmt, monkeypatch):
    root, c, weight_bytes = files
    # read/dequantise in chunks much smaller than a tensor, as at real sizes (16 MiB vs ~1 GB)
    monkeypatch.setattr("jaxens.models.gguf.CHUNK_BYTES", 1 << 15)
    monkeypatch.setattr("jaxens.models.loading.CHUNK_BYTES", 1 << 15)
    load = (lambda: load_gguf(root / "m.gguf", progress=False)) if fmt == "gguf" else (lambda: load_hf_dir(root / "hf"))
    load()  # first call: imports, tracing of the abstract module
    model, peak = _traced_peak(load)
    assert _member_bytes(model) == weight_bytes
    print(f"{fmt}: traced peak {peak / weight_bytes:.3f}x the weight bytes")
    assert peak <= 1.3 * weight_bytes, f"{fmt} loader peaked at {peak / weight_bytes:.2f}x the weights"
    # the member's arrays are the buffers numpy allocated (adopted, not copied), so tracing saw them
    assert peak >= 0.9 * weight_bytes
    toks = np.arange(8)[None] % c.vocab_size
    assert np.isfinite(np.asarray(full_logits(model, toks))).all()


def test_eager_path_is_seen_holding_two_copies(files):
    root, _, weight_bytes = files

    def eager():
        cfg, tensors = gguf_to_hf(root / "m.gguf", progress=False)
        return model_from_hf_tensors(cfg, tensors)

    eager()
    _, peak = _traced_peak(eager)
    # the dequantised dict and the stacked params overlap (the module's jax copy is not even traced)
    assert peak >= 1.6 * weight_bytes


def test_lean_and_eager_loads_agree(files):
    root, _, _ = files
    cfg, tensors = gguf_to_hf(root / "m.gguf", progress=False)
    eager = model_from_hf_tensors(cfg, tensors).params_numpy()
    lean = load_gguf(root / "m.gguf", progress=False).params_numpy()
    assert eager.keys() == lean.keys()
    for k in eager:
        np.testing.assert_array_equal(lean[k], eager[k], err_msg=k)


def test_scanned_layers_fill_one_stack(files):
    root, c, weight_bytes = files
    hf_cfg = json.loads((root / "hf" / "config.json").read_text())
    from jaxens.models.assemble import assemble
    import jaxens.models.llama.params as lp
    from jaxens.models.llama import Llama
    from jaxens.models.loading import safetensors_index

    config = LlamaConfig.from_hf(hf_cfg)
    config = LlamaConfig(**{**config.__dict__, "scan_layers": True})
    scanned = assemble(Llama, config, lp.HF_TOP, lp.HF_LAYER, safetensors_index(root / "hf" / "model.safetensors"))
    unrolled = load_hf_dir(root / "hf")
    assert _member_bytes(scanned) == weight_bytes
    a, b = scanned.params_numpy(), unrolled.params_numpy()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_bfloat16_member_matches_eager_cast(files, fmt):
    root, _, weight_bytes = files
    cfg, tensors = gguf_to_hf(root / "m.gguf", progress=False)
    if fmt == "gguf":
        lean = load_gguf(root / "m.gguf", dtype="bfloat16", progress=False)
    else:
        from jaxens.models.loading import read_safetensors

        cfg = json.loads((root / "hf" / "config.json").read_text())
        tensors = read_safetensors(root / "hf" / "model.safetensors")
        lean = load_hf_dir(root / "hf", dtype="bfloat16")
    eager = model_from_hf_tensors(cfg, tensors, dtype="bfloat16")
    assert _member_bytes(lean) == weight_bytes // 2
    from flax import nnx

    for a, b in zip(jax.tree.leaves(nnx.state(lean)), jax.tree.leaves(nnx.state(eager))):
        assert a.dtype == b.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
