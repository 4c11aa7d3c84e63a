r"""Samplers: pure functions from a combined next-token log-distribution to token ids.

Given combined log-probabilities :math:`\log p \in \mathbb{R}^{B \times v}` (the output of a
combiner, i.e. truncation is applied to the *combined* distribution, after combining), a
:class:`Sampler` draws :math:`y_b \sim q_b` where :math:`q` is obtained from :math:`p` by the
following steps, in this order (Hugging Face ``generate`` semantics, each step renormalising
the output of the previous one):

1. an optional external ``mask`` (``True`` = allowed; e.g. BAT, ``jaxens.combiners.bat.bat_accept``):
   :math:`\ell_j = -\infty` where ``mask`` is ``False``.  A row whose mask allows no token
   with positive probability ignores the mask (a valid token is always produced);
2. temperature :math:`T`: :math:`\ell \leftarrow \ell / T`;
3. top-k: keep :math:`\{j : \ell_j \ge \ell_{(k)}\}` (the k-th largest value; ties at the
   boundary are all kept, as in ``TopKLogitsWarper``);
4. top-p (nucleus): sort descending, keep token :math:`j` if the mass of the strictly earlier
   tokens is :math:`< p`, i.e. the smallest prefix whose mass reaches :math:`p`; ties with the
   last kept value are kept too (``TopPLogitsWarper`` up to tie order);
5. min-p: keep :math:`\{j : q_j \ge p_{\min} \max_k q_k\}` (``MinPLogitsWarper``);
6. greedy: :math:`y_b = \arg\max_j \ell_j` (first index on ties); otherwise
   :math:`y_b \sim \mathrm{softmax}(\ell)`.

``-inf`` log-probabilities are never sampled; all functions are jit/vmap friendly and
contain no Python control flow on traced values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

NEG_INF = -jnp.inf


def apply_mask(logits: Float[Array, "B v"], mask: Bool[Array, "B v"] | None) -> Float[Array, "B v"]:
    """``-inf`` where ``mask`` is False; rows left without a finite entry keep their logits."""
    if mask is None:
        return logits
    if mask.shape != logits.shape:
        raise ValueError(f"mask must have the shape of the log-probs {logits.shape}, got {mask.shape}")
    masked = jnp.where(mask, logits, NEG_INF)
    empty = jnp.all(masked == NEG_INF, axis=-1, keepdims=True)
    return jnp.where(empty, logits, masked)


def top_k_mask(logits: Float[Array, "B v"], k: int) -> Bool[Array, "B v"]:
    """Tokens whose logit is at least the k-th largest (ties kept)."""
    v = logits.shape[-1]
    if k >= v:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def top_p_mask(logits: Float[Array, "B v"], p: float) -> Bool[Array, "B v"]:
    """Smallest set of most likely tokens whose mass reaches ``p`` (ties at the edge kept)."""
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly earlier tokens
    keep = before < p
    keep = keep.at[..., 0].set(True)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
    return logits >= threshold


def min_p_mask(logits: Float[Array, "B v"], min_p: float) -> Bool[Array, "B v"]:
    """Tokens with probability at least ``min_p`` times the largest probability."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    return (logits - top) >= jnp.log(jnp.asarray(min_p, logits.dtype))


@dataclasses.dataclass(frozen=True)
class Sampler:
    r"""Static sampling settings (hashable); ``sampler(log_probs, key, mask=None) -> tokens``.

    Draws :math:`y_b \sim \mathrm{softmax}(\mathrm{trunc}(\log p_b / T))` (greedy:
    :math:`y_b = \arg\max_j \log p_{bj}`), the truncation being mask, top-k, top-p and min-p in
    the order of the module doc.  ``greedy()`` (:func:`greedy`) is ``Sampler(greedy=True)``.

    Args:
      temperature: ``T > 0``; divides the combined log-probs before truncation.
      top_k: keep the ``k >= 1`` most likely tokens (``None``: no top-k).
      top_p: nucleus mass in ``(0, 1]`` (``None`` or 1: no top-p).
      min_p: relative probability floor in ``[0, 1]`` (``None`` or 0: no min-p).
      greedy: take the argmax (the truncations above do not change it).

    Example::

      sampler = Sampler(temperature=0.7, top_p=0.9)
      tokens = sampler(log_probs, jax.random.key(0))          # (B,) int32
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    greedy: bool = False

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number > 0 (use greedy=True for argmax), got {t!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be an int >= 1 (or None), got {self.top_k!r}")
        if self.top_p is not None:
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None:
            if isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
                raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be a bool, got {self.greedy!r}")

    @property
    def truncates(self) -> bool:
        """True when the sampler changes the distribution beyond temperature (greedy included)."""
        return (
            self.greedy
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1)
            or (self.min_p is not None and self.min_p > 0)
        )

    @property
    def is_plain(self) -> bool:
        """Untruncated sampling at temperature 1: draws exactly from the given distribution."""
        return not self.truncates and self.temperature == 1

    def logits(self, log_probs: Float[Array, "B v"], mask: Bool[Array, "B v"] | None = None) -> Float[Array, "B v"]:
        """The (unnormalised) log-distribution that is sampled: steps 1-5 of the module doc."""
        if log_probs.ndim != 2:
            raise ValueError(f"log_probs must have shape (B, v), got {log_probs.shape}")
        x = log_probs.astype(jnp.promote_types(log_probs.dtype, jnp.float32))
        x = apply_mask(x, mask)
        if self.temperature != 1:
            x = x / self.temperature
        if self.top_k is not None:
            x = jnp.where(top_k_mask(x, self.top_k), x, NEG_INF)
        if self.top_p is not None and self.top_p < 1:
            x = jnp.where(top_p_mask(x, self.top_p), x, NEG_INF)
        if self.min_p is not None and self.min_p > 0:
            x = jnp.where(min_p_mask(x, self.min_p), x, NEG_INF)
        return x

    def probs(self, log_probs: Float[Array, "B v"], mask: Bool[Array, "B v"] | None = None) -> Float[Array, "B v"]:
        """The exact distribution of the sampled token (one-hot for greedy)."""
        x = self.logits(log_probs, mask)
        if self.greedy:
            return jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=x.dtype)
        return jax.nn.softmax(x, axis=-1)

    def __call__(
        self,
        log_probs: Float[Array, "B v"],
        key: Array,
        mask: Bool[Array, "B v"] | None = None,
    ) -> Int[Array, " B"]:
        x = self.logits(log_probs, mask)
        if self.greedy:
            return jnp.argmax(x, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def greedy() -> Sampler:
    """Argmax of the combined distribution: ``Sampler(greedy=True)``.

    (Not a ``Sampler.greedy()`` classmethod: ``greedy`` is the dataclass field.)
    """
    return Sampler(greedy=True)
