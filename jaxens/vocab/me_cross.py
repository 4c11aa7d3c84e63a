r"""ME across tokenizers: one drawn member per step, its token decoded to text.

At each step a member :math:`i \sim \mathrm{Categorical}(w)` is drawn for the whole batch, only that
member is synced and run, and every row samples :math:`y \sim \hat p_i` on member :math:`i`'s own
vocabulary: plain sampling (any temperature, applied to the drawn member) gives the per-step
mixture :math:`\sum_i w_i \hat p_i` over *text pieces*.  The rule is that of the one-vocabulary
:class:`jaxens.combiners.mixture.MixtureEnsemble`: a truncating sampler (greedy, top-k, top-p,
min-p) would truncate the drawn member, not the mixture, and raises ``ValueError`` unless
``per_member_truncation=True`` asks for exactly that (the published ME); GaC truncates the
combined distribution.  The token's
bytes are appended to the row's text; the other members re-encode the new text when they are next
drawn (one chunked catch-up through their KV caches, :class:`jaxens.vocab.cross_decode.CrossEngine`).
Source: SOURCES.md §2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.combiners.base import check_weights, normalized_weights
from jaxens.vocab.cross_decode import CrossMethod, id_pieces, text_mask


class MECross(CrossMethod):
    """ME across tokenizers (see the module doc).

    Example::

        dec = CrossDecoder([smol, gemma], [smol_tok, gemma_tok], MECross(), Sampler(temperature=0.7))
    """

    needs_alignment = False

    def __init__(self, weights=None, per_member_truncation: bool = False):
        check_weights(weights, None, owner="me")
        self.weights = weights
        self.per_member_truncation = per_member_truncation

    def setup(self, eng):
        if eng.sampler.truncates and not self.per_member_truncation:
            raise ValueError(
                f"ME across tokenizers samples the members' mixture exactly only without truncation, got {eng.sampler}; "
                "use Sampler(temperature=...) (the temperature applies to every member), GaC() for greedy / top-k / "
                "top-p / min-p of the combined distribution, or MECross(per_member_truncation=True) to truncate the "
                "drawn member's distribution (the published ME, NOT the mixture's truncation)"
            )
        n = eng.num_members
        w = normalized_weights(self.weights, n, np.float64, owner="me")
        self._logw = jnp.log(jnp.asarray(w, jnp.float32))
        self._masks = [jnp.broadcast_to(jnp.asarray(text_mask(eng.view(i))), (eng.B, eng.view(i).vocab_size))
                       for i in range(n)]

    def step(self, eng, key):
        k1, k2 = jax.random.split(key)
        i = int(jax.random.categorical(k1, self._logw))
        lp = eng.logprobs(i)
        ids = eng.sample(lp, k2, self._masks[i])
        info = {f"draws_{i}": 1, "positions": int(eng.active.sum())}
        return id_pieces(eng.view(i), ids), info
