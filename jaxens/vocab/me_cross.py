r"""ME across tokenizers: one drawn member per step, its token decoded to text.

At each step a member :math:`i \sim \mathrm{Categorical}(w)` is drawn for the whole batch, only that
member is synced and run, and every row samples :math:`y \sim \hat p_i` on member :math:`i`'s own
vocabulary (the sampler's truncation applies to the drawn member, as in the published ME; plain
sampling gives the per-step mixture :math:`\sum_i w_i \hat p_i` over *text pieces*).  The token's
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
    needs_alignment = False

    def __init__(self, weights=None):
        check_weights(weights, None, owner="me")
        self.weights = weights

    def setup(self, eng):
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
