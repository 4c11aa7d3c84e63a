"""Cross-tokenizer ensembling: alignment (anchors, union vocabulary, word boundaries), the
cross-tokenizer decode loop, and its methods (GaC, UniTE, DeePEn, SAFE, ME across tokenizers),
plus bits per byte of held-out text for members and cross-vocabulary ensembles."""

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
from jaxens.vocab.bpb import (
    BPB,
    CrossBPB,
    cross_bits_per_byte,
    member_bits_per_byte,
    teacher_forced_log_probs,
    word_mixture_bits_per_byte,
)
from jaxens.vocab.cross_decode import CrossDecoder, CrossMethod, CrossOutput
from jaxens.vocab.deepen import DeePEn, deepen_combine
from jaxens.vocab.eval_cross import CrossEvalConfig, evaluate_cross
from jaxens.vocab.me_cross import MECross
from jaxens.vocab.safe import SAFE
from jaxens.vocab.union import GaC, gac_combine
from jaxens.vocab.unite import UniTE, unite_combine

# name -> factory(**options) for the CLI and the evaluation harness
CROSS_METHODS = {"gac": GaC, "unite": UniTE, "deepen": DeePEn, "safe": SAFE, "me": MECross}


def make_cross_method(name: str, **options) -> CrossMethod:
    """Build a cross-tokenizer method by name (``gac``, ``unite``, ``deepen``, ``safe``, ``me``)."""
    if name not in CROSS_METHODS:
        raise ValueError(f"unknown cross-tokenizer method {name!r}; known: {', '.join(sorted(CROSS_METHODS))}")
    return CROSS_METHODS[name](**options)


def cross_generate(members, tokenizers, method, prompts, max_new_tokens, sampler=None, *, seed=0, **options):
    """One-shot: ``CrossDecoder(members, tokenizers, method).generate(prompts, max_new_tokens)``;
    ``method`` is a :class:`CrossMethod` or a name (``options`` go to its constructor)."""
    if isinstance(method, str):
        method = make_cross_method(method, **options)
    return CrossDecoder(members, tokenizers, method, sampler).generate(prompts, max_new_tokens, seed=seed)


__all__ = [
    "Alignment", "BPB", "CROSS_METHODS", "CrossBPB", "CrossEvalConfig", "evaluate_cross", "teacher_forced_log_probs", "CrossDecoder", "CrossMethod", "CrossOutput", "DeePEn", "GaC", "MECross",
    "SAFE", "TokenizerView", "UniTE", "align", "common_boundaries", "cross_bits_per_byte", "cross_generate", "deepen_combine",
    "gac_combine", "make_cross_method", "member_bits_per_byte", "normalize_token", "retokenize_tail",
    "token_offsets", "unite_combine", "word_boundaries", "word_mixture_bits_per_byte",
]
