r"""The host side of decoding: :class:`Decoder`, :func:`generate` and :class:`DecodeOutput`.

:class:`Decoder` validates the requests, left-pads the prompts to a length bucket, runs the
compiled prefill and loop of :class:`jaxens.decode.loop.DecodeLoop`, and streams or collects the
tokens.

**Compiles.**  The member weights are ``nnx.split`` once and passed as arguments; the member
graph definitions, the combiner and the sampler are closed over (build them once and reuse the
:class:`Decoder`).  ``max_new_tokens`` (per row), the stop tokens, the PRNG key and the chunk
end are arrays, so one compile of the prefill serves each (bucket, batch size, cache length)
and one compile of the loop each (batch size, cache length).  With ``cache_len=None`` the cache
length is the next power of two ``>= 64`` of ``L + max_new_tokens (+ max_pending for ME)``; fix
``cache_len`` to never recompile for a new ``max_new_tokens``.

**Streaming** re-enters the same compiled loop in chunks of ``chunk_steps`` steps (the loop
condition takes the chunk end as an array), so streaming costs no extra compile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxens.combiners.base import Combiner
from jaxens.combiners.mixture import MixtureEnsemble
from jaxens.decode.loop import DecodeHooks, DecodeLoop, DecodeState, Truncation
from jaxens.models.base import accepts_logits_keyword
from jaxens.sampling import Sampler


class DecodeOutput(NamedTuple):
    """Result of :meth:`Decoder.generate` (host arrays).

    ``tokens[b, :lengths[b]]`` is row ``b``'s completion; when ``finished[b]`` its stop token sits
    at ``tokens[b, lengths[b]]``; the rest is ``pad_id``.  ``stats`` aggregates the combiner's
    per-step ``info`` over the steps each row was active (:mod:`jaxens.decode.stats`: bool
    leaves count True, integer leaves are histograms over ``0..7``, e.g. solver statuses, float
    leaves keep maxima) or, for ME, a :class:`jaxens.combiners.mixture.MEStats`.  ``state`` is
    the final :class:`~jaxens.decode.loop.DecodeState` when ``return_state=True``.

    Example::

        out = Decoder(members, logit_average()).generate([[1, 2, 3]], 8)
        completion = out.tokens[0, : out.lengths[0]]
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    steps: int
    stats: Any
    state: DecodeState | None = None


# ---------------------------------------------------------------- member helpers


def next_pow2(x: int, lo: int = 1) -> int:
    """The smallest ``lo * 2^k >= x``."""
    p = lo
    while p < x:
        p *= 2
    return p


def _config_attr(member, names):
    cfg = getattr(member, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return None


def member_vocab(member) -> int:
    """A member's ``config.vocab_size`` (``ValueError`` when it has none)."""
    v = _config_attr(member, ("vocab_size",))
    if v is None:
        raise ValueError(f"member {type(member).__name__} has no config.vocab_size (see jaxens/models/base.py)")
    return v


def member_context(member) -> int | None:
    """A member's context length (positions), or ``None`` when its config names none."""
    return _config_attr(member, ("max_len", "max_position_embeddings", "max_seq_len", "n_positions", "context_length"))


def shared_vocab_size(members: Sequence[Any], hint: str = "") -> int:
    """The members' common ``config.vocab_size``; different sizes raise ``ValueError`` (+ ``hint``)."""
    vocabs = [member_vocab(m) for m in members]
    if len(set(vocabs)) != 1:
        raise ValueError(
            f"members have different vocabulary sizes {vocabs}; {hint}pass vocab_size={min(vocabs)} if they share "
            "a tokenizer and only pad their embedding tables differently"
        )
    return vocabs[0]


# ---------------------------------------------------------------- the decoder


class Decoder:
    r"""A compiled ensemble decoder: ``Decoder(members, combiner, sampler).generate(prompts, N)``.

    At each step every row draws :math:`y_t \sim \mathrm{sampler}(p_t)` from the combined
    distribution :math:`\log p_t = \mathrm{combine}(\ell_{1,t}, \dots, \ell_{n,t})` of the members'
    next-token logits given the row's prompt and :math:`y_{<t}` (ME: one drawn member's
    distribution).

    Example::

        dec = Decoder([m1, m2], logit_average(), Sampler(greedy=True), stop_tokens=[eos])
        out = dec.generate([[1, 5, 7], [1, 9]], max_new_tokens=16)
        out.tokens[0, : out.lengths[0]]                    # row 0's completion

    Args:
      members: NNX modules following :mod:`jaxens.models.base` (a single member works).
      combiner: a :class:`jaxens.combiners.base.Combiner` (all members run every step) or a
        :class:`jaxens.combiners.mixture.MixtureEnsemble` (ME: one member per step).
      sampler: :class:`jaxens.sampling.Sampler`, applied to the combined distribution.
      stop_tokens: token ids that end a row (e.g. the tokenizer's EOS ids).
      pad_id: id written to the left padding and after a row stops.
      buckets: allowed padded prompt lengths (sorted); default powers of two ``>= 16``.
      cache_len: static number of cache slots; ``None`` picks a power of two per call.
      vocab_size: use the first ``vocab_size`` logits of every member (members that share a
        tokenizer but pad their embedding tables differently); default: the members' common
        ``config.vocab_size`` (a mismatch raises).
      truncation: optional ``f(log_probs, member_logits) -> allowed`` mask applied before the
        sampler's own truncation (the BAT hook); a static, hashable function.
      cache_dtype: dtype of the KV caches (``None``: each member's default).
      hooks: :class:`~jaxens.decode.loop.DecodeHooks`: where the member weights and the loop
        carry live (``params``, ``state``) and which batch sizes fit (``batch``);
        :class:`jaxens.sharding.ShardedDecoder` is a :class:`Decoder` with mesh hooks.
    """

    def __init__(
        self,
        members: Sequence[Any],
        combiner: Combiner | MixtureEnsemble,
        sampler: Sampler | None = None,
        *,
        stop_tokens: Sequence[int] = (),
        pad_id: int = 0,
        buckets: Sequence[int] | None = None,
        cache_len: int | None = None,
        vocab_size: int | None = None,
        truncation: Truncation | None = None,
        cache_dtype=None,
        hooks: DecodeHooks | None = None,
    ):
        members = list(members)
        if not members:
            raise ValueError("Decoder needs at least one member")
        sampler = Sampler() if sampler is None else sampler
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be a jaxens.sampling.Sampler, got {type(sampler).__name__}")
        if not isinstance(combiner, (Combiner, MixtureEnsemble)):
            raise ValueError(
                f"combiner must be a jaxens.Combiner or a jaxens.MixtureEnsemble, got {type(combiner).__name__}"
            )
        hooks = DecodeHooks() if hooks is None else hooks
        if not isinstance(hooks, DecodeHooks):
            raise ValueError(f"hooks must be a jaxens.decode.DecodeHooks, got {type(hooks).__name__}")
        vocabs = [member_vocab(m) for m in members]
        if vocab_size is None:
            vocab_size = shared_vocab_size(
                members, "this combiner needs a shared vocabulary (for different tokenizers use jaxens.vocab); "
            )
        elif not 0 < vocab_size <= min(vocabs):
            raise ValueError(f"vocab_size must be in [1, {min(vocabs)}] (smallest member vocabulary), got {vocab_size}")
        if isinstance(combiner, MixtureEnsemble):
            combiner.normalized_weights(len(members))  # checks the number of weights
            combiner.check_sampler(sampler)
            if truncation is not None:
                raise ValueError(
                    "a truncation mask (e.g. BAT) needs the combined distribution, which ME never computes; "
                    "use the prob_average combiner for an exact, truncated mixture"
                )
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, {vocab_size}), got {pad_id}")
        stop = [int(t) for t in stop_tokens]
        if any(not 0 <= t < vocab_size for t in stop):
            raise ValueError(f"stop_tokens must be ids in [0, {vocab_size}), got {stop}")
        if buckets is not None:
            buckets = tuple(sorted(int(b) for b in buckets))
            if not buckets or buckets[0] < 1:
                raise ValueError(f"buckets must be positive lengths, got {buckets}")
        self.members = members
        self.combiner = combiner
        self.sampler = sampler
        self.stop_tokens = tuple(stop)
        self.pad_id = int(pad_id)
        self.buckets = buckets
        self.cache_len = cache_len
        self.vocab_size = int(vocab_size)
        self.truncation = truncation
        self.cache_dtype = cache_dtype
        self.hooks = hooks
        self.is_me = isinstance(combiner, MixtureEnsemble)
        contexts = [c for c in (member_context(m) for m in members) if c is not None]
        self.context = min(contexts) if contexts else None
        split = [nnx.split(m) for m in members]
        states = tuple(s for _, s in split)
        self._states = states if hooks.params is None else tuple(hooks.params(s) for s in states)
        self.loop = DecodeLoop(
            tuple(g for g, _ in split),
            tuple(accepts_logits_keyword(m) for m in members),
            combiner,
            sampler,
            vocab_size=self.vocab_size,
            pad_id=self.pad_id,
            truncation=truncation,
            cache_dtype=cache_dtype,
            constrain_state=hooks.state,
        )
        self.num_traces = self.loop.num_traces
        self._prefill_jit = jax.jit(self.loop.prefill, static_argnames=("cache_len",))
        self._run_jit = jax.jit(self.loop.run, donate_argnums=(1,))

    @property
    def member_states(self) -> tuple:
        """The members' ``nnx.State`` as the compiled functions receive them (after ``hooks.params``)."""
        return self._states

    def _bucket(self, n: int) -> int:
        if self.buckets is None:
            return next_pow2(n, 16)
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets[-1]}")

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens, *, key=None, seed: int = 0):
        """Validate, pad and prefill; returns ``(state, L)`` for :meth:`run_until`."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if self.hooks.batch is not None:
            self.hooks.batch(len(prompts))
        rows = []
        for i, p in enumerate(prompts):
            p = np.asarray(p)
            if p.ndim != 1 or not (p.size == 0 or np.issubdtype(p.dtype, np.integer)):
                raise ValueError(f"prompt {i} must be a flat list of integer token ids, got shape {p.shape} {p.dtype}")
            if p.size == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS)")
            if p.min() < 0 or p.max() >= self.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size})")
            rows.append(p.astype(np.int32))
        B = len(rows)
        max_new = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (B,)).astype(np.int32)
        if np.any(max_new < 0):
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        longest = max(len(r) for r in rows)
        need = longest + int(max_new.max())
        if self.context is not None and need > self.context:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {int(max_new.max())} = {need} exceeds the members' "
                f"context of {self.context} positions; shorten the prompt or generate fewer tokens"
            )
        L = self._bucket(longest)
        slack = self.combiner.max_pending if self.is_me else 0
        need_slots = L + int(max_new.max()) + slack
        if self.cache_len is None:
            S = next_pow2(need_slots, 64)
        else:
            S = int(self.cache_len)
            if need_slots > S:
                raise ValueError(
                    f"padded prompt ({L}) + max_new_tokens ({int(max_new.max())})"
                    + (f" + ME max_pending ({slack})" if slack else "")
                    + f" = {need_slots} exceeds cache_len={S}; raise cache_len or shorten the request"
                )
        prompt = np.full((B, L), self.pad_id, np.int32)
        pad = np.zeros((B,), np.int32)
        for b, r in enumerate(rows):
            prompt[b, L - len(r) :] = r
            pad[b] = L - len(r)
        stop = np.asarray(self.stop_tokens if self.stop_tokens else (-1,), np.int32)
        if key is None:
            key = jax.random.key(seed)
        state = self._prefill_jit(
            self._states, jnp.asarray(prompt), jnp.asarray(pad), jnp.asarray(max_new), jnp.asarray(stop), key,
            self.loop.init_combiner_state(B), cache_len=S,
        )
        return state, L

    def run_until(self, state: DecodeState, until: int) -> DecodeState:
        """Advance the compiled loop to step ``until`` (or until every row stopped).

        ``state`` is donated: use the returned state, not the one passed in.
        """
        return self._run_jit(self._states, state, jnp.int32(until))

    def stream(
        self, prompts, max_new_tokens, *, key=None, seed: int = 0, chunk_steps: int = 8, _out: list | None = None
    ) -> Iterator[list[list[int]]]:
        """Yield, every ``chunk_steps`` steps, the new tokens of each row (stop tokens excluded)."""
        if chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
        state, L = self.start(prompts, max_new_tokens, key=key, seed=seed)
        total = int(np.max(np.asarray(max_new_tokens)))
        emitted = np.zeros((state.tokens.shape[0],), np.int64)
        step = 0
        while True:
            step = min(step + chunk_steps, total)
            state = self.run_until(state, step)
            ngen = np.asarray(state.num_generated)
            cur = int(state.step)
            toks = np.asarray(state.tokens[:, L : L + cur])
            yield [toks[b, emitted[b] : ngen[b]].tolist() for b in range(toks.shape[0])]
            emitted = ngen.astype(np.int64)
            if cur >= total or bool(np.all(np.asarray(state.done))):
                break
        if _out is not None:
            _out.append((state, L))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens,
        *,
        key=None,
        seed: int = 0,
        callback: Callable[[list[list[int]]], None] | None = None,
        chunk_steps: int = 8,
        return_state: bool = False,
    ) -> DecodeOutput:
        """Decode a batch; ``callback(new_tokens_per_row)`` streams every ``chunk_steps`` steps."""
        if callback is None:
            state, L = self.start(prompts, max_new_tokens, key=key, seed=seed)
            state = self.run_until(state, int(np.max(np.asarray(max_new_tokens))))
        else:
            out: list = []
            for chunk in self.stream(prompts, max_new_tokens, key=key, seed=seed, chunk_steps=chunk_steps, _out=out):
                callback(chunk)
            state, L = out[0]
        total = int(np.max(np.asarray(max_new_tokens)))
        return DecodeOutput(
            tokens=np.asarray(state.tokens[:, L : L + total]),
            lengths=np.asarray(state.num_generated),
            finished=np.asarray(state.finished),
            steps=int(state.step),
            stats=jax.device_get(state.stats),
            state=state if return_state else None,
        )


def generate(
    members: Sequence[Any],
    combiner: Combiner | MixtureEnsemble,
    prompts: Sequence[Sequence[int]],
    max_new_tokens,
    sampler: Sampler | None = None,
    *,
    key=None,
    seed: int = 0,
    **decoder_kwargs,
) -> DecodeOutput:
    """One-shot convenience: ``Decoder(members, combiner, sampler, **kw).generate(...)``.

    Builds (and compiles) a new decoder on every call; keep a :class:`Decoder` to reuse compiles.

    Example::

        out = generate([m1, m2], prob_average(), [[1, 2, 3]], 8, Sampler(top_p=0.9), seed=0)
    """
    return Decoder(members, combiner, sampler, **decoder_kwargs).generate(prompts, max_new_tokens, key=key, seed=seed)
