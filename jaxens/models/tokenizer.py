"""Tokenizers built from a GGUF file's vocabulary with the ``tokenizers`` library.

Two vocabulary kinds occur (``tokenizer.ggml.model``):

* ``gpt2``: byte-level BPE (SmolLM2, Qwen2, Llama 3, GPT-2) from ``tokens`` and ``merges``, with the
  pre-tokenizer regex named by ``tokenizer.ggml.pre``.
* ``llama``: SentencePiece BPE with scores (Gemma, Llama 2).  SentencePiece repeatedly merges the
  adjacent pair whose merged piece has the highest score; a byte-pair-encoding model whose merge
  ranks sort the pairs ``(l, r)`` (with ``l``, ``r``, ``l+r`` all normal pieces) by the score of
  ``l+r`` (descending) does the same merges.  Spaces are written as ``▁`` (no dummy prefix unless
  ``add_space_prefix``), characters outside the vocabulary fall back to the ``<0xNN>`` byte
  pieces, and user-defined pieces (``\\n``, tabs, HTML tags for Gemma 3) are matched before BPE,
  as SentencePiece does.  (transformers' own GGUF conversion of Gemma 3's vocabulary is wrong:
  it gives ``▁t he ▁c at`` for ``" the cat"``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from jaxens.models.gguf import read_metadata

CHAT_TEMPLATE_CHECKED = "chat_template.checked"  # in a tokenizer cache: the GGUF's chat template was looked up
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_PRE_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _bpe_merges_from_scores(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = normal.get(left), normal.get(right)
            if li is not None and ri is not None:
                found.append((-float(scores[pid]), pid, li, ri, left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def build_tokenizer(meta: dict):
    """A ``tokenizers.Tokenizer`` from GGUF metadata (with arrays), plus its special token names."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    types = np.asarray(meta.get("tokenizer.ggml.token_type", np.full(n, NORMAL)), dtype=np.int64)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:  # duplicated pieces: keep the first id
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)

    def tok_id(key):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if v is None or int(v) >= n else int(v)

    unk = tok_id("unknown")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = meta.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _PRE_REGEX)
        if pre in _PRE_REGEX:
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated", invert=False), byte_level])
        elif pre == "smollm":
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("gpt2", "default", None):
            tk.pre_tokenizer = byte_level
        else:
            raise ValueError(f"GGUF byte-level BPE pre-tokenizer {pre!r} is not supported "
                             f"(supported: gpt2, smollm, {', '.join(_PRE_REGEX)})")
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float64)
        merges = _bpe_merges_from_scores(tokens, scores, types)
        unk_tok = tokens[unk] if unk is not None else None
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_tok, fuse_unk=True, byte_fallback=True))
        norms = [normalizers.Replace(" ", "▁")]
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            norms.insert(0, normalizers.Prepend("▁"))
            dec.append(decoders.Strip(" ", 1, 0))
        tk.normalizer = normalizers.Sequence(norms)
        tk.decoder = decoders.Sequence(dec)
    else:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")

    added = []
    for i in np.nonzero((types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN))[0]:
        t = tokens[i]
        added.append(AddedToken(t, special=bool(types[i] != USER_DEFINED), normalized="▁" in t))
    tk.add_tokens(added)

    specials = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = tok_id(key)
        if i is not None:
            specials[key] = tokens[i]
    if meta.get("tokenizer.ggml.add_bos_token", False) and "bos" in specials:
        b = specials["bos"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, vocab[b])])
    return tk, specials


def tokenizer_from_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """A ``transformers.PreTrainedTokenizerFast`` for a GGUF file.

    ``cache_dir``: a folder where the tokenizer is saved (``save_pretrained``) on the first call and
    read back later, without opening the GGUF again (the vocabulary is not parsed and the
    SentencePiece merges are not rebuilt a second time).  The GGUF's ``tokenizer.chat_template``
    (instruct checkpoints) becomes ``tok.chat_template``; a cache saved before templates were
    kept is completed once (:data:`CHAT_TEMPLATE_CHECKED` marks it).
    """
    from transformers import PreTrainedTokenizerFast

    cache_dir = Path(cache_dir) if cache_dir is not None else None
    if cache_dir is not None and (cache_dir / "tokenizer.json").is_file() and (
        cache_dir / "tokenizer_config.json"
    ).is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(cache_dir))
        if not tok.chat_template and not (cache_dir / CHAT_TEMPLATE_CHECKED).exists():
            template = read_metadata(path).get("tokenizer.chat_template")
            if template:
                tok.chat_template = str(template)
                (cache_dir / "chat_template.jinja").write_text(tok.chat_template)
            (cache_dir / CHAT_TEMPLATE_CHECKED).write_text("")
        return tok
    meta = read_metadata(path, arrays=True)
    tk, specials = build_tokenizer(meta)
    tok = _wrap(tk, specials)
    if meta.get("tokenizer.chat_template"):
        tok.chat_template = str(meta["tokenizer.chat_template"])
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=cache_dir.name + "-"))
        tok.save_pretrained(str(tmp))
        (tmp / CHAT_TEMPLATE_CHECKED).write_text("")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    return tok


def _wrap(tk, specials: dict):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=specials.get("bos"),
        eos_token=specials.get("eos"),
        unk_token=specials.get("unknown"),
        pad_token=specials.get("padding"),
        clean_up_tokenization_spaces=False,
    )
