"""The combiner interface: an optax-like pair of pure functions.

``Combiner(init, combine)``: ``init(batch_size) -> state`` and
``combine(logits, state) -> (log_probs, state, info)`` where ``logits`` is a sequence of the
members' next-token logits, each ``(B, v)``, ``log_probs`` is ``(B, v)`` and ``info`` is a pytree
of diagnostics whose structure is fixed for a given combiner (so it can ride in a
``lax.while_loop`` carry).  The state carries warm starts between decoding steps.

Factories close over static settings and over parameters (member weights, temperatures,
soft-constraint strengths); build the combiner inside a loss function to differentiate with
respect to those parameters, exactly as one would with ``optax.inject_hyperparams``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float


class EmptyState(NamedTuple):
    """State of a stateless combiner."""


class AveragingInfo(NamedTuple):
    nonfinite: Bool[Array, " B"]  # row had NaN/+inf logits; its output is the uniform fallback


class Combiner(NamedTuple):
    r"""A combiner: ``init(batch_size) -> state`` and ``combine(logits, state) -> (log_probs, state, info)``.

    ``logits`` is a sequence of the members' next-token logits :math:`\ell_i \in \mathbb R^{B \times v}`;
    ``log_probs`` is the combined :math:`\log p \in \mathbb R^{B \times v}` (each row
    normalised, :math:`\sum_j p_{bj} = 1`).

    Example (the member-0 combiner)::

        first = Combiner(lambda batch_size: EmptyState(),
                         lambda logits, state: (jax.nn.log_softmax(logits[0]), state, ()))
        log_p, state, info = first.combine([l1, l2], first.init(B))
    """

    init: Callable[[int], Any]
    combine: Callable[[Sequence[Float[Array, "B v"]], Any], tuple[Float[Array, "B v"], Any, Any]]


def check_member_logits(logits: Sequence[ArrayLike], num_members: int | None = None) -> tuple[int, int]:
    """Trace-time shape checks shared by the combiners; returns ``(B, v)``."""
    if isinstance(logits, jnp.ndarray) or not isinstance(logits, (list, tuple)):
        raise ValueError(
            "combine expects a sequence (list/tuple) of per-member logits, each of shape (B, v); "
            f"got {type(logits).__name__}"
        )
    if len(logits) == 0:
        raise ValueError("combine got no member logits")
    if num_members is not None and len(logits) != num_members:
        raise ValueError(f"combiner was built for {num_members} members but got {len(logits)} logits")
    shapes = [tuple(x.shape) for x in logits]
    for i, s in enumerate(shapes):
        if len(s) != 2:
            raise ValueError(f"member {i} logits must have shape (B, v), got {s}")
        if s != shapes[0]:
            raise ValueError(
                f"member logits disagree in shape: member 0 has {shapes[0]}, member {i} has {s}; "
                "members must share the batch size and the vocabulary (use jaxens.vocab for "
                "cross-tokenizer ensembles)"
            )
        if not jnp.issubdtype(logits[i].dtype, jnp.floating):
            raise ValueError(f"member {i} logits must be floating point, got {logits[i].dtype}")
    if shapes[0][0] == 0:
        raise ValueError("empty batch: member logits have batch size 0")
    return shapes[0]


def check_weights(weights: Any, n: int, dtype=jnp.float32, *, owner: str = "the combiner") -> Array:
    """Member weights as an ``(n,)`` array of ``dtype``: uniform ``1/n`` when ``None``; the shape
    is checked at trace time (``ValueError`` naming ``owner``).  Not normalised: see
    :func:`normalized_weights`."""
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype)
    w = jnp.asarray(weights, dtype)
    if w.shape != (n,):
        raise ValueError(
            f"{owner} has {w.size} weights but the ensemble has {n} members: "
            f"weights must have shape ({n},) (one per member), got {w.shape}"
        )
    return w


def normalized_weights(weights: Any, n: int, dtype=jnp.float32, *, owner: str = "the combiner") -> Array:
    r"""Mixture weights on the simplex: :math:`\tilde w_i = w_i / \sum_k w_k` (uniform when ``None``).

    The one place member weights are checked and normalised (:func:`check_weights`, then the
    division); jit- and grad-friendly.

    Example::

        normalized_weights([2.0, 1.0, 1.0], 3)        # [0.5, 0.25, 0.25]
        normalized_weights(None, 4)                   # [0.25, 0.25, 0.25, 0.25]
    """
    w = check_weights(weights, n, dtype, owner=owner)
    return w / jnp.sum(w)
