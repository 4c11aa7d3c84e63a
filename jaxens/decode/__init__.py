"""Decoding: the compiled loop (:mod:`~jaxens.decode.loop`), the host API
(:mod:`~jaxens.decode.api`), decode statistics (:mod:`~jaxens.decode.stats`) and the combiner
registry (:mod:`~jaxens.decode.registry`)."""

from jaxens.decode.api import DecodeOutput, Decoder, generate
from jaxens.decode.loop import DecodeHooks, DecodeLoop, DecodeState, Truncation
from jaxens.decode.registry import (
    COMBINERS,
    BottleneckDecodeInfo,
    bottleneck_combiner,
    make_combiner,
    register_combiner,
)
from jaxens.decode.stats import STATUS_BINS, init_stats, update_stats

__all__ = [
    "COMBINERS",
    "STATUS_BINS",
    "BottleneckDecodeInfo",
    "DecodeHooks",
    "DecodeLoop",
    "DecodeOutput",
    "DecodeState",
    "Decoder",
    "Truncation",
    "bottleneck_combiner",
    "generate",
    "init_stats",
    "make_combiner",
    "register_combiner",
    "update_stats",
]
