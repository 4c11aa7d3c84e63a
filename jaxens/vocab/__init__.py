"""Cross-tokenizer ensembling: alignment (anchors, union vocabulary, word boundaries), the
cross-tokenizer decode loop, and its methods (GaC, UniTE, DeePEn, SAFE, ME across tokenizers).
Bits per byte of held-out text is in the harness (:mod:`jaxens.harness.bpb`)."""

from jaxens.vocab.align import (
    Alignment,
    TokenizerView,
    align,
    common_boundaries,
    normalize_token,
    retokenize_tail,
    token_offsets,
    word_boundaries,
)
from jaxens.vocab.cross_decode import CrossDecoder, CrossMethod, CrossOutput
from jaxens.vocab.deepen import DeePEn, deepen_combine
from jaxens.vocab.me_cross import MECross
from jaxens.vocab.safe import SAFE
from jaxens.vocab.union import GaC, gac_combine
from jaxens.vocab.unite import UniTE, unite_combine

# name -> factory(**options)
CROSS_METHODS = {"gac": GaC, "unite": UniTE, "deepen": DeePEn, "safe": SAFE, "me": MECross}


def make_cross_method(name: str, **options) -> CrossMethod:
    """Build a cross-tokenizer method by name (``gac``, ``unite``, ``deepen``, ``safe``, ``me``)."""
    if name not in CROSS_METHODS:
        raise ValueError(f"unknown cross-tokenizer method {name!r}; known: {', '.join(sorted(CROSS_METHODS))}")
    return CROSS_METHODS[name](**options)


def cross_generate(members, tokenizers, method, prompts, max_new_tokens, sampler=None, *, seed=0, **options):
    """One-shot: ``CrossDecoder(members, tokenizers, method).generate(prompts, max_new_tokens)``;
    ``method`` is a :class:`CrossMethod` or a name (``options`` go to its constructor).

    Example::

        out = cross_generate([smol, gemma], [smol_tok, gemma_tok], "gac", ["Alice was"], 16)
        print(out.texts[0])
    """
    if isinstance(method, str):
        method = make_cross_method(method, **options)
    return CrossDecoder(members, tokenizers, method, sampler).generate(prompts, max_new_tokens, seed=seed)


__all__ = [
    "Alignment", "CROSS_METHODS", "CrossDecoder", "CrossMethod", "CrossOutput", "DeePEn", "GaC", "MECross",
    "SAFE", "TokenizerView", "UniTE", "align", "common_boundaries", "cross_generate", "deepen_combine",
    "gac_combine", "make_cross_method", "normalize_token", "retokenize_tail",
    "token_offsets", "unite_combine", "word_boundaries",
]
