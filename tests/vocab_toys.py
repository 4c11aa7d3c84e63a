"""Hand-built tokenizers with known alignments for the jaxens.vocab tests.

* ``byte_bpe()``: byte-level BPE ("Ġ" convention, GPT-2 byte table) over every byte, with merges
  for `` the``, `` cat``, `` un`` + ``believ`` + ``ably`` (so " unbelievably" is 3 tokens).
* ``sp_bpe()``: SentencePiece-style BPE ("▁" convention, ``<0xNN>`` byte fallback) over ASCII
  letters, with merges for ``▁the``, ``▁cat``, ``▁unbeliev`` + ``ably`` (2 tokens) and ``▁dog``.

Known alignment: shared strings are the printable ASCII letters, " the", " cat", "ably", " " and
bytes that both spell; " dog" is only in the SentencePiece one, " un" and "believ" only in the
byte-level one.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from jaxens.vocab.align import _byte_decoder

BYTE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "u"), ("Ġu", "n"),
               ("b", "e"), ("l", "i"), ("be", "li"), ("e", "v"), ("beli", "ev"), ("a", "b"), ("l", "y"), ("ab", "ly")]
SP_MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("a", "t"), ("▁c", "at"), ("▁", "u"), ("▁u", "n"),
             ("b", "e"), ("l", "i"), ("be", "li"), ("e", "v"), ("beli", "ev"), ("▁un", "believ"), ("a", "b"),
             ("l", "y"), ("ab", "ly"), ("▁", "d"), ("o", "g"), ("▁d", "og")]


def byte_bpe() -> Tokenizer:
    chars = sorted(_byte_decoder(), key=lambda c: _byte_decoder()[c])
    vocab = {"<|endoftext|>": 0}
    for c in chars:
        vocab[c] = len(vocab)
    for a, b in BYTE_MERGES:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=BYTE_MERGES))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tk


def sp_bpe() -> Tokenizer:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁"] + [chr(x) for x in range(ord("a"), ord("z") + 1)] + [chr(x) for x in range(ord("A"), ord("Z") + 1)] + list(".,"):
        vocab.setdefault(c, len(vocab))
    for a, b in SP_MERGES:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=SP_MERGES, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
    return tk


def digits_only() -> Tokenizer:
    """A plain tokenizer whose strings share nothing with letters-only vocabularies."""
    vocab = {"[EOS]": 0, **{str(d): d + 1 for d in range(10)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[EOS]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.add_special_tokens([AddedToken("[EOS]", special=True)])
    return tk


def letters_only() -> Tokenizer:
    vocab = {"[EOS]": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[EOS]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.add_special_tokens([AddedToken("[EOS]", special=True)])
    return tk
