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

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxens.objectives import unusable_rows


class EmptyState(NamedTuple):
    """State of a stateless combiner."""


class AveragingInfo(NamedTuple):
    r"""Per-row diagnostics of the averaging combiners (the status contract every combiner follows).

    Example::

        log_p, _, info = prob_average().combine([l1, l2], None)
        info.status           # (B,) Status codes: SOLVED, NONFINITE_INPUT, INFEASIBLE
        info.bad_members      # (B, n): member i's row b held NaN / +inf or was all -inf

    * ``status[b]`` - ``SOLVED``: every member's row was usable; ``NONFINITE_INPUT``: some member's
      row ``b`` held NaN / ``+inf`` or masked every token (``-inf`` everywhere); that member is
      dropped from row ``b`` and the others are combined with their weights renormalised,
      :math:`\tilde w_i \propto w_i [i \text{ usable}]` (the uniform distribution when no member with
      :math:`w_i > 0` is usable); ``INFEASIBLE`` (logit averaging only): the members' supports do
      not intersect, the product of experts is empty, and the row is their probability average.
    * ``bad_members[b, i]`` names the members dropped from row ``b``; ``nonfinite[b]`` is their ``any``.
    """

    status: Int[Array, " B"]
    bad_members: Bool[Array, "B n"]
    nonfinite: Bool[Array, " B"]


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


def unusable_members(logits: Sequence[ArrayLike]) -> Bool[Array, "B n"]:
    r"""``bad[b, i]``: member ``i``'s logits for row ``b`` hold NaN or ``+inf``, or are ``-inf`` on every
    token (no distribution); such a row gets status ``NONFINITE_INPUT`` from every combiner.

    Example::

        unusable_members([jnp.array([[0.0, 1.0]]), jnp.array([[-jnp.inf, -jnp.inf]])])   # [[False, True]]
    """
    return unusable_rows(jnp.stack([jnp.asarray(l) for l in logits], axis=1))


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


WEIGHTS_FIX = "pass one finite weight >= 0 per member, not all zero (e.g. 1 1 for two equal members), or no weights for uniform ones"


def _shown(weights: Any) -> Any:
    try:
        return np.asarray(jax.device_get(weights), np.float64).tolist()
    except (TypeError, ValueError):
        return weights


def _value_error(owner: str, problem: str, weights: Any) -> ValueError:
    return ValueError(f"{owner}: weights must be finite, >= 0 and not all zero ({problem}), got {_shown(weights)}; "
                      f"{WEIGHTS_FIX}")


def _length_error(owner: str, w: Any, n: int) -> ValueError:
    return ValueError(f"{owner} has {np.size(w)} weights but the ensemble has {n} members: weights must have "
                      f"shape ({n},) (one per member), got {np.shape(w)}")


def check_weights(weights: Any, n: int | None, dtype=jnp.float32, *, owner: str = "the combiner") -> Any:
    r"""The one check of member weights (every combiner, same- and cross-vocabulary, and the CLI's
    ``--weights``): ``None`` -> uniform :math:`1/n`; otherwise one weight per member,
    :math:`w_i \ge 0`, finite, :math:`\sum_i w_i > 0`, else a ``ValueError`` naming ``owner``, the
    problem and the fix.  Concrete weights (lists, numpy, jax arrays) are checked in full and come
    back as a numpy array of ``dtype``; traced weights (under ``jit``/``grad``) only by shape.
    ``n=None`` (a factory that does not know the ensemble yet) checks everything but the length.
    Not normalised: see :func:`normalized_weights`.

    Example::

        check_weights([0.7, 0.3], 2)           # array([0.7, 0.3], dtype=float32)
        check_weights([1.0, -1.0], 2)          # ValueError: ... a negative weight ...
    """
    if weights is None:
        return None if n is None else np.full((n,), 1.0 / n, dtype)
    if isinstance(weights, jax.core.Tracer):
        w = jnp.asarray(weights, dtype)
        if n is not None and w.shape != (n,):
            raise _length_error(owner, w, n)
        return w
    try:
        w = np.asarray(jax.device_get(weights), np.float64)
    except (TypeError, ValueError):
        raise _value_error(owner, "not numbers", weights) from None
    if n is not None and w.shape != (n,):
        raise _length_error(owner, w, n)
    if w.ndim != 1:
        raise ValueError(f"{owner}: weights must be a vector (one per member), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise _value_error(owner, "a weight is NaN or infinite", weights)
    if np.any(w < 0):
        raise _value_error(owner, "a weight is negative", weights)
    if not w.sum() > 0:
        raise _value_error(owner, "all weights are zero", weights)
    return w.astype(dtype)


def normalized_weights(weights: Any, n: int, dtype=jnp.float32, *, owner: str = "the combiner") -> Any:
    r"""Mixture weights on the simplex: :math:`\tilde w_i = w_i / \sum_k w_k` (uniform when ``None``).

    The one place member weights are checked (:func:`check_weights`) and normalised, for the
    same-vocabulary combiners and the cross-tokenizer methods alike: concrete weights are
    normalised in float64 and returned as a numpy array of ``dtype``; traced ones (jit, grad)
    as a jax array.

    Example::

        normalized_weights([2.0, 1.0, 1.0], 3)        # [0.5, 0.25, 0.25]
        normalized_weights(None, 4)                   # [0.25, 0.25, 0.25, 0.25]
    """
    w = check_weights(weights, n, np.float64 if not isinstance(weights, jax.core.Tracer) else dtype, owner=owner)
    if isinstance(w, np.ndarray):
        return (w / w.sum()).astype(dtype)
    return w / jnp.sum(w)
