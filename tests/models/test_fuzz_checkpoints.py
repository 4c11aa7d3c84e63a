"""Corrupted checkpoints give a clear error, never a crash or a hang.

A tiny random-weight Llama is written as a Hugging Face directory (``save_hf_dir``, safetensors)
and as a llama-arch GGUF (``gguf.GGUFWriter``, float32 tensors).  Each case corrupts one copy
(a truncation at a random offset, or 1-8 random byte flips, with a seed per case) and loads it:
the loader must either succeed (a flip inside tensor data only changes a weight) or raise
``ValueError`` whose message names the file.  Each case runs under a 20 s alarm (a hang fails
the test).  ``read_safetensors`` / ``read_metadata`` + ``gguf_to_hf`` run on every case; the full
``load_hf_dir`` / ``load_gguf`` (building the model) on every fifth.
"""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
from flax import nnx

from jaxens.models.gguf import gguf_to_hf, load_gguf, read_metadata
from jaxens.models.llama import Llama, LlamaConfig, params_to_hf
from jaxens.models.loading import load_hf_dir, read_safetensors, save_hf_dir

N_CASES = 110  # per format (220 in all)
TIMEOUT_S = 20


@contextmanager
def _alarm(seconds: int, what: str):
    def handler(signum, frame):
        raise TimeoutError(f"loader hung for {seconds}s on {what}")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _model():
    return Llama(LlamaConfig.tiny(), rngs=nnx.Rngs(0))


_GGUF = {  # transformers block suffix -> GGUF block tensor
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _permute(w, n_head):  # llama.cpp's convert_hf_to_gguf permutation of q/k
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model) -> Path:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    meta = {"block_count": c.n_layers, "embedding_length": c.d_model, "context_length": c.max_len,
            "feed_forward_length": c.d_ff, "attention.head_count": c.n_heads,
            "attention.head_count_kv": c.n_kv_heads, "attention.key_length": c.head_dim,
            "attention.value_length": c.head_dim, "vocab_size": c.vocab_size}
    for k, v in meta.items():
        w.add_uint32(f"llama.{k}", int(v))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_eps)
    w.add_float32("llama.rope.freq_base", c.rope_theta)
    for name, t in params_to_hf(c, model.params_numpy()).items():
        stem, suffix = name.rsplit(".", 1)
        if stem in _TOP:
            g = f"{_TOP[stem]}.{suffix}"
        else:
            parts = stem.split(".")
            g = f"blk.{parts[2]}.{_GGUF['.'.join(parts[3:])]}.{suffix}"
        t = np.asarray(t, np.float32)
        if g.endswith("attn_q.weight"):
            t = _permute(t, c.n_heads)
        elif g.endswith("attn_k.weight"):
            t = _permute(t, c.n_kv_heads)
        w.add_tensor(g, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    model = _model()
    hf = save_hf_dir(model, root / "hf")
    gg = write_tiny_gguf(root / "tiny.gguf", model)
    # the pristine files load
    assert read_safetensors(hf / "model.safetensors")
    assert read_metadata(gg)["general.architecture"] == "llama"
    load_gguf(gg, progress=False)
    load_hf_dir(hf)
    return hf, gg


def corrupt(data: bytes, seed: int) -> tuple[bytes, str]:
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        # truncations: biased towards the header, where the structure lives
        cut = int(rng.integers(0, min(len(data), 2048))) if rng.random() < 0.6 else int(rng.integers(0, len(data)))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    buf = bytearray(data)
    k = int(rng.integers(1, 9))
    where = []
    for _ in range(k):
        i = int(rng.integers(0, min(len(buf), 4096))) if rng.random() < 0.7 else int(rng.integers(0, len(buf)))
        buf[i] ^= int(rng.integers(1, 256))
        where.append(i)
    return bytes(buf), f"{k} byte flips at {where}"


# gguf_to_hf raises a ValueError that does not name the file for these corruptions (reported to
# the lead: the tensor-name check in jaxens.models.gguf._hf_name's caller and a reshape of a
# tensor with a corrupted shape field escape the "file {path}: ..." wrapping).
UNNAMED_GGUF: set[int] = set()  # seeds 17, 63, 77 were unnamed before the loader's fix


def _expect_clear(fn, path: Path, what: str, known_unnamed: bool = False):
    """Success, or ValueError naming the file; anything else (or a hang) fails."""
    try:
        with _alarm(TIMEOUT_S, what):
            fn()
    except ValueError as e:
        if path.name not in str(e) and known_unnamed:
            pytest.xfail(f"known: {what}: ValueError without the file name: {e}")
        assert path.name in str(e), f"{what}: error does not name the file: {e!r}"


@pytest.mark.parametrize("seed", range(N_CASES))
def test_corrupted_safetensors(pristine, tmp_path, seed):
    hf, _ = pristine
    data = (hf / "model.safetensors").read_bytes()
    bad, what = corrupt(data, seed)
    d = tmp_path / "hf"
    shutil.copytree(hf, d)
    f = d / "model.safetensors"
    f.write_bytes(bad)
    _expect_clear(lambda: read_safetensors(f), f, f"safetensors seed {seed}: {what}")
    if seed % 5 == 0:
        _expect_clear(lambda: load_hf_dir(d), f, f"load_hf_dir seed {seed}: {what}")


@pytest.mark.parametrize("seed", range(N_CASES))
def test_corrupted_gguf(pristine, tmp_path, seed):
    _, gg = pristine
    bad, what = corrupt(gg.read_bytes(), 10_000 + seed)
    f = tmp_path / "tiny.gguf"
    f.write_bytes(bad)
    _expect_clear(lambda: read_metadata(f), f, f"read_metadata seed {seed}: {what}")
    known = seed in UNNAMED_GGUF
    if seed % 5 == 0:
        _expect_clear(lambda: load_gguf(f, progress=False), f, f"load_gguf seed {seed}: {what}", known)
    _expect_clear(lambda: gguf_to_hf(f, progress=False), f, f"gguf_to_hf seed {seed}: {what}", known)
