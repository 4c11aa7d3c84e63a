"""Members by name: a zoo name, a Hugging Face checkpoint directory or a GGUF file ->
``(member, tokenizer)``, and the vocabulary sizes the commands compare.

* :func:`load_member` resolves a spec: an existing directory is read with
  :func:`jaxens.models.loading.load_hf_dir` (tokenizer: ``transformers.AutoTokenizer``), an
  existing ``.gguf`` file with :func:`jaxens.models.gguf.load_gguf` (tokenizer from the GGUF's
  metadata), any other existing path is an error, and everything else is a zoo name
  (:func:`jaxens.harness.zoo.load`).
* :func:`tokenizer_vocab_size` is the size of the tokenizer's vocabulary (``len(tokenizer)``, else
  ``tokenizer.vocab_size``, else the member's ``config.vocab_size``); :func:`vocabularies_differ`
  is true when two loaded members have different ones (the cross-tokenizer commands apply).
* :func:`common_vocab` is the vocabulary shared by same-vocabulary members: their common
  ``config.vocab_size``, or a given ``vocab_size`` no larger than the smallest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxens.harness import zoo
from jaxens.models.gguf import load_gguf
from jaxens.models.loading import load_hf_dir
from jaxens.models.tokenizer import tokenizer_from_gguf


def load_member(spec: str, dtype: str = "float32"):
    """``(member, tokenizer)`` for a zoo name, a Hugging Face directory or a ``.gguf`` file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        from transformers import AutoTokenizer  # heavy to import; only this branch needs it

        return load_hf_dir(path, dtype=dtype), AutoTokenizer.from_pretrained(str(path))
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype), tokenizer_from_gguf(path)
    if path.exists():
        hint = ""
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
            hint = " (pickle checkpoints are refused: they can run code; convert it to safetensors)"
        raise ValueError(f"member {spec!r}: expected a checkpoint directory or a .gguf file{hint}")
    looks_like_path = spec.endswith((".gguf", ".safetensors")) or "/" in spec or spec.startswith(("~", "."))
    if looks_like_path:
        raise ValueError(f"member {spec!r}: file not found (give an existing .gguf file, a checkpoint "
                         f"directory, or a zoo name)")
    return zoo.load(spec, dtype=dtype)


def display_name(spec: str) -> str:
    """The name a member spec gets in reports: the file or folder name of a path, else the spec."""
    return Path(spec).name if Path(spec).exists() else spec


def tokenizer_vocab_size(member, tokenizer) -> int | None:
    """The tokenizer's vocabulary size (``len``, else ``vocab_size``), else the member's config."""
    for get in (lambda: len(tokenizer), lambda: tokenizer.vocab_size, lambda: member.config.vocab_size):
        try:
            return int(get())
        except (TypeError, AttributeError):
            continue
    return None


def vocabularies_differ(loaded: Sequence[tuple[Any, Any]]) -> bool:
    """True when the ``(member, tokenizer)`` pairs have known vocabulary sizes that are not all equal."""
    sizes = {tokenizer_vocab_size(m, t) for m, t in loaded}
    return None not in sizes and len(sizes) > 1


def common_vocab(members: Sequence[Any], vocab_size: int | None = None) -> int:
    """The members' shared ``config.vocab_size`` (``vocab_size`` when given: in ``[1, smallest]``)."""
    vocabs = []
    for i, m in enumerate(members):
        v = getattr(getattr(m, "config", None), "vocab_size", None)
        if not isinstance(v, int):
            raise ValueError(f"member {i} ({type(m).__name__}) has no config.vocab_size")
        vocabs.append(v)
    if vocab_size is None:
        if len(set(vocabs)) != 1:
            raise ValueError(
                f"members have different vocabulary sizes {vocabs}; same-vocabulary evaluation needs one. "
                f"If they share a tokenizer and only pad their tables, pass vocab_size={min(vocabs)}"
            )
        return vocabs[0]
    if not 0 < vocab_size <= min(vocabs):
        raise ValueError(f"vocab_size must be in [1, {min(vocabs)}], got {vocab_size}")
    return int(vocab_size)
