r"""The compiled decode loop: members -> combiner -> sampler, in one ``lax.while_loop``.

Data path per step (``DESIGN.md``)::

    last tokens -> each member's forward (KV cache) -> logits l_i (B, v)
                -> combiner.combine([l_1, ..., l_n], state) -> log p (B, v)
                -> sampler (+ optional truncation mask, e.g. BAT) -> y (B,) -> token buffer

or, for ME (:mod:`jaxens.mixture`), one drawn member's forward per step.

**Layout.**  Prompts are left-padded to a static length bucket ``L`` (powers of two by default)
and written into a token buffer of ``S`` slots (``cache_len``; slot ``s`` of every member's
cache holds token ``s`` of the buffer).  Row ``b`` has ``pad_b`` padding slots; its token in
slot ``s >= pad_b`` has position ``s - pad_b`` and ``kv_mask[b, s] = s >= pad_b``.  The prefill
runs every member over slots ``[0, L-1)``; the last prompt token stays *pending*, so every step
has the same form: each member consumes its pending tokens and returns the logits for the next
slot.

**Compiles.**  The member weights are ``nnx.split`` once and passed as arguments; the member
graph definitions, the combiner and the sampler are closed over (build them once and reuse the
:class:`Decoder`).  ``max_new_tokens`` (per row), the stop tokens, the PRNG key and the chunk
end are arrays, so one compile of the prefill serves each (bucket, batch size, cache length)
and one compile of the loop each (batch size, cache length).  With ``cache_len=None`` the cache
length is the next power of two of ``L + max_new_tokens (+ max_pending for ME)``; fix
``cache_len`` to never recompile for a new ``max_new_tokens``.

**Streaming** re-enters the same compiled loop in chunks of ``chunk_steps`` steps (the loop
condition takes the chunk end as an array), so streaming costs no extra compile.

**Stopping.**  Row ``b`` stops after a token in ``stop_tokens`` (not counted in its length) or
after ``max_new_tokens[b]`` tokens; finished rows emit ``pad_id``.  The loop ends when every row
has stopped.  The PRNG key is split every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxens.combiners.base import Combiner
from jaxens.mixture import MixtureEnsemble, me_step
from jaxens.models.base import KVCache, accepts_logits_keyword
from jaxens.models.layers import select_positions
from jaxens.sampling import Sampler

STATUS_BINS = 8  # integer diagnostics (e.g. solver Status codes) are histogrammed over 0..7

# truncation(combined_log_probs (B, v), member_logits [(B, v)] * n) -> allowed (B, v)
Truncation = Callable[[Float[Array, "B v"], Sequence[Float[Array, "B v"]]], Bool[Array, "B v"]]


class DecodeState(NamedTuple):
    """The loop carry (all arrays; shapes fixed for a compile)."""

    step: Int[Array, ""]  # decoding steps done
    key: Array  # PRNG key, split every step
    tokens: Int[Array, "B S"]  # left-padded prompt, then the generated tokens
    length: Int[Array, ""]  # filled slots of `tokens` (L + step)
    pad: Int[Array, " B"]  # left padding of each row
    done: Bool[Array, " B"]
    finished: Bool[Array, " B"]  # row produced a stop token
    num_generated: Int[Array, " B"]  # generated tokens, stop token excluded
    max_new: Int[Array, " B"]
    stop: Int[Array, " k"]
    caches: tuple  # one KVCache per member
    cached: Int[Array, " n"]  # slots already in each member's cache
    combiner_state: Any
    stats: Any  # aggregated diagnostics


class DecodeOutput(NamedTuple):
    """Result of :meth:`Decoder.generate` (host arrays).

    ``tokens[b, :lengths[b]]`` is row ``b``'s completion; when ``finished[b]`` its stop token sits
    at ``tokens[b, lengths[b]]``; the rest is ``pad_id``.  ``stats`` aggregates the combiner's
    per-step ``info`` over the steps each row was active (bool leaves: counts of True; integer
    leaves: histograms over ``0..7``, e.g. solver statuses; float leaves: maxima) or, for ME, a
    :class:`jaxens.mixture.MEStats`.  ``state`` is the final :class:`DecodeState` when
    ``return_state=True``.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    steps: int
    stats: Any
    state: DecodeState | None = None


# ---------------------------------------------------------------- diagnostics aggregation


def _init_stats(info_struct: Any) -> Any:
    def init(x):
        if x.dtype == jnp.bool_:
            return jnp.zeros(x.shape, jnp.int32)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.zeros(x.shape + (STATUS_BINS,), jnp.int32)
        return jnp.full(x.shape, -jnp.inf, x.dtype)

    return jax.tree.map(init, info_struct)


def _update_stats(stats: Any, info: Any, active: Bool[Array, " B"]) -> Any:
    B = active.shape[0]

    def upd(acc, x):
        x = jnp.asarray(x)
        if x.ndim >= 1 and x.shape[0] == B:
            act = active.reshape((B,) + (1,) * (x.ndim - 1))
        else:
            act = jnp.any(active)
        act = jnp.broadcast_to(act, x.shape)
        if x.dtype == jnp.bool_:
            return acc + (x & act).astype(jnp.int32)
        if jnp.issubdtype(x.dtype, jnp.integer):
            hist = jax.nn.one_hot(jnp.clip(x, 0, STATUS_BINS - 1), STATUS_BINS, dtype=jnp.int32)
            return acc + hist * act.astype(jnp.int32)[..., None]
        x = jnp.where(jnp.isnan(x), jnp.inf, x)
        return jnp.maximum(acc, jnp.where(act, x, -jnp.inf).astype(acc.dtype))

    return jax.tree.map(upd, stats, info)


# ---------------------------------------------------------------- helpers


def _next_pow2(x: int, lo: int = 1) -> int:
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


def _member_vocab(member) -> int:
    v = _config_attr(member, ("vocab_size",))
    if v is None:
        raise ValueError(f"member {type(member).__name__} has no config.vocab_size (see jaxens/models/base.py)")
    return v


def _member_context(member) -> int | None:
    return _config_attr(member, ("max_len", "max_position_embeddings", "max_seq_len", "n_positions", "context_length"))


# ---------------------------------------------------------------- the decoder


class Decoder:
    """A compiled ensemble decoder: ``Decoder(members, combiner, sampler).generate(prompts, N)``.

    Args:
      members: NNX modules following :mod:`jaxens.models.base` (a single member works).
      combiner: a :class:`jaxens.Combiner` (all members run every step) or a
        :class:`jaxens.mixture.MixtureEnsemble` (ME: one member per step).
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
    ):
        members = list(members)
        if not members:
            raise ValueError("Decoder needs at least one member")
        sampler = Sampler() if sampler is None else sampler
        if not isinstance(sampler, Sampler):
            raise ValueError(f"sampler must be a jaxens.sampling.Sampler, got {type(sampler).__name__}")
        if not isinstance(combiner, (Combiner, MixtureEnsemble)):
            raise ValueError(
                f"combiner must be a jaxens.Combiner or a jaxens.mixture.MixtureEnsemble, got {type(combiner).__name__}"
            )
        vocabs = [_member_vocab(m) for m in members]
        if vocab_size is None:
            if len(set(vocabs)) != 1:
                raise ValueError(
                    f"members have different vocabulary sizes {vocabs}; this combiner needs a shared vocabulary. "
                    "If they share a tokenizer and only pad their embedding tables differently, pass "
                    f"vocab_size={min(vocabs)}; for different tokenizers use jaxens.vocab"
                )
            vocab_size = vocabs[0]
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
        self.is_me = isinstance(combiner, MixtureEnsemble)
        contexts = [c for c in (_member_context(m) for m in members) if c is not None]
        self.context = min(contexts) if contexts else None
        split = [nnx.split(m) for m in members]
        self._graphdefs = tuple(g for g, _ in split)
        self._states = tuple(s for _, s in split)
        self._logits_kw = tuple(accepts_logits_keyword(m) for m in members)
        self.num_traces = {"prefill": 0, "run": 0}
        self._prefill_jit = jax.jit(self._prefill, static_argnames=("cache_len",))
        self._run_jit = jax.jit(self._run, donate_argnums=(1,))

    # ------------------------------------------------------------ traced functions

    def _forward_fn(self, models, tokens, pad):
        S = tokens.shape[1]
        kv_mask = jnp.arange(S)[None, :] >= pad[:, None]
        V = self.vocab_size

        def forward(j: int, T: int, cache: KVCache, start, logits="all"):
            """Member ``j`` on slots ``[start, start + T)``; ``logits`` as in ``models/base.py``."""
            toks = jax.lax.dynamic_slice_in_dim(tokens, start, T, axis=1)
            pos = jnp.maximum(start + jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None], 0)
            args = (toks, pos.astype(jnp.int32), cache, jnp.asarray(start, jnp.int32), kv_mask)
            if self._logits_kw[j]:
                out, cache = models[j](*args, logits=logits)
            else:  # a member without the optional keyword: full logits, then select
                out, cache = models[j](*args)
                out = select_positions(out, logits)
            return (None if out is None else out[..., :V]), cache

        return forward

    def _init_combiner_state(self, B):
        """Built eagerly (outside ``jit``) and passed to the prefill as an argument, so arrays a
        combiner keeps in its state (e.g. the bottleneck problem) ride in the loop carry instead of
        being baked into the compiled program as constants (which XLA then constant-folds)."""
        return () if self.is_me else self.combiner.init(B)

    def _init_combiner_stats(self, B, cstate):
        n, V = len(self.members), self.vocab_size
        if self.is_me:
            return (), self.combiner.init_stats(n)
        struct = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), cstate)
        dummy = [jax.ShapeDtypeStruct((B, V), jnp.float32)] * n
        _, _, info = jax.eval_shape(self.combiner.combine, dummy, struct)
        return cstate, _init_stats(info)

    def _prefill(self, states, prompt, pad, max_new, stop, key, cstate, *, cache_len):
        self.num_traces["prefill"] += 1
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        B, L = prompt.shape
        tokens = jnp.full((B, cache_len), self.pad_id, jnp.int32).at[:, :L].set(prompt)
        forward = self._forward_fn(models, tokens, pad)
        caches = []
        for j, m in enumerate(models):
            cache = m.init_cache(B, cache_len, self.cache_dtype)
            if L > 1:  # the prompt minus its last token: cache only, no logits
                _, cache = forward(j, L - 1, cache, jnp.int32(0), logits="none")
            caches.append(cache)
        cstate, stats = self._init_combiner_stats(B, cstate)
        return DecodeState(
            step=jnp.int32(0),
            key=key,
            tokens=tokens,
            length=jnp.int32(L),
            pad=pad,
            done=max_new <= 0,
            finished=jnp.zeros((B,), bool),
            num_generated=jnp.zeros((B,), jnp.int32),
            max_new=max_new,
            stop=stop,
            caches=tuple(caches),
            cached=jnp.full((len(models),), L - 1, jnp.int32),
            combiner_state=cstate,
            stats=stats,
        )

    def _step(self, models, s: DecodeState) -> DecodeState:
        B = s.tokens.shape[0]
        forward = self._forward_fn(models, s.tokens, s.pad)
        active = ~s.done
        if self.is_me:
            key, k_me, k_tok = jax.random.split(s.key, 3)
            logp, caches, cached, info = me_step(
                self.combiner, forward, s.caches, s.cached, s.length, k_me, (B, self.vocab_size)
            )
            cstate = s.combiner_state
            stats = self.combiner.update_stats(s.stats, info)
            mask = None
        else:
            key, k_tok = jax.random.split(s.key)
            logits, caches = [], []
            for j in range(len(models)):
                l, c = forward(j, 1, s.caches[j], s.length - 1, logits="last")
                logits.append(l[:, 0])
                caches.append(c)
            caches = tuple(caches)
            cached = jnp.full_like(s.cached, s.length)
            logp, cstate, info = self.combiner.combine(logits, s.combiner_state)
            if logp.shape != (B, self.vocab_size):
                raise ValueError(f"combiner returned log-probs of shape {logp.shape}, expected {(B, self.vocab_size)}")
            stats = _update_stats(s.stats, info, active)
            mask = None if self.truncation is None else self.truncation(logp, logits)
        tok = self.sampler(logp, k_tok, mask)
        tok = jnp.where(active, tok, self.pad_id).astype(jnp.int32)
        is_stop = jnp.any(tok[:, None] == s.stop[None, :], axis=-1) & active
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.length, axis=1)
        step = s.step + 1
        return s._replace(
            step=step,
            key=key,
            tokens=tokens,
            length=s.length + 1,
            done=s.done | is_stop | (step >= s.max_new),
            finished=s.finished | is_stop,
            num_generated=s.num_generated + (active & ~is_stop).astype(jnp.int32),
            caches=caches,
            cached=cached,
            combiner_state=cstate,
            stats=stats,
        )

    def _run(self, states, s: DecodeState, until):
        self.num_traces["run"] += 1
        models = [nnx.merge(g, st) for g, st in zip(self._graphdefs, states)]
        return jax.lax.while_loop(
            lambda s: (s.step < until) & ~jnp.all(s.done),
            lambda s: self._step(models, s),
            s,
        )

    # ------------------------------------------------------------ host side

    def _bucket(self, n: int) -> int:
        if self.buckets is None:
            return _next_pow2(n, 16)
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets[-1]}")

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens, *, key=None, seed: int = 0):
        """Validate, pad and prefill; returns ``(state, L)`` for :meth:`run_until`."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of token-id lists")
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
            S = _next_pow2(need_slots, 64)
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
            self._init_combiner_state(B), cache_len=S,
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
    """
    return Decoder(members, combiner, sampler, **decoder_kwargs).generate(prompts, max_new_tokens, key=key, seed=seed)


# ---------------------------------------------------------------- combiner registry

# name -> factory(members, weights=None, temperature=1.0, **options) -> Combiner | MixtureEnsemble
COMBINERS: dict[str, Callable[..., Combiner | MixtureEnsemble]] = {}


def register_combiner(name: str, factory: Callable[..., Combiner | MixtureEnsemble]) -> None:
    """Register ``factory(members, weights=None, temperature=1.0, **options)`` under ``name``."""
    COMBINERS[name] = factory


def make_combiner(name: str, members: Sequence[Any], **options) -> Combiner | MixtureEnsemble:
    """Build a registered combiner by name; unknown names list the known ones."""
    if name not in COMBINERS:
        raise ValueError(f"unknown combiner {name!r}; known combiners: {', '.join(sorted(COMBINERS))}")
    return COMBINERS[name](members, **options)


class BottleneckDecodeInfo(NamedTuple):
    """Per-step diagnostics of a bottleneck combiner in the decode loop (per row).

    Aggregated by :class:`Decoder` into ``status``: a histogram over :class:`jaxens.Status` codes
    (``(B, 8)``: steps each row ended SOLVED / MAX_ITERS / INFEASIBLE / ...) and maxima over the
    steps of ``iterations``, ``primal_residual`` and ``gap``.
    """

    status: Int[Array, " B"]
    iterations: Float[Array, " B"]
    primal_residual: Float[Array, " B"]
    gap: Float[Array, " B"]


def _hard_members(hard: Any) -> Any:
    if hard is None or (isinstance(hard, str) and hard.lower() == "none"):
        return ()
    if isinstance(hard, str):
        if hard.lower() != "all":
            raise ValueError(f"hard must be 'all', 'none' or member indices, got {hard!r}")
        return "all"
    return tuple(int(i) for i in hard)


def bottleneck_combiner(
    members: Sequence[Any],
    objective: str = "kl",
    *,
    weights=None,
    temperature: float = 1.0,
    hard: Sequence[int] | str | None = "all",
    soft: Sequence[int] | None = None,
    rho=None,
    lam: float = 0.0,
    solver: Any = None,
    vocab_size: int | None = None,
    dtype=jnp.float32,
    **options,
) -> Combiner:
    """The bottleneck combiner for ``members``, for the decode loop.

    Builds the :class:`jaxens.BottleneckProblem` once from the members' ``unembedding()``
    ``(W_i, b_i)`` (the first ``vocab_size`` rows; default the common ``config.vocab_size``) and
    returns :func:`jaxens.combiners.bottleneck.bottleneck` whose per-step ``info`` is reduced to a
    :class:`BottleneckDecodeInfo` (the decode loop histograms the solver statuses).

    ``hard``: ``"all"`` (default), ``"none"``/``()`` or member indices; ``soft``: member indices
    with strengths ``rho``; ``lam``: smoothing towards the logit average.  ``temperature`` must
    be 1: the bottleneck distribution is defined by the members' own distributions; temper
    the *combined* distribution with the sampler's temperature instead.
    """
    from jaxens.combiners.bottleneck import bottleneck
    from jaxens.problem import make_problem

    if temperature != 1.0:
        raise ValueError(
            f"the bottleneck combiners take no member temperature (got {temperature}); use "
            "Sampler(temperature=...) (CLI: --temperature) to temper the combined distribution"
        )
    members = list(members)
    if vocab_size is None:
        vocabs = [_member_vocab(m) for m in members]
        if len(set(vocabs)) != 1:
            raise ValueError(
                f"members have different vocabulary sizes {vocabs}; pass vocab_size={min(vocabs)} if they share "
                "a tokenizer and only pad their embedding tables differently"
            )
        vocab_size = vocabs[0]
    Ws, bs = [], []
    for i, m in enumerate(members):
        W, b = m.unembedding()
        if W.shape[0] < vocab_size:
            raise ValueError(f"member {i} has an unembedding of shape {W.shape}, fewer than vocab_size={vocab_size} rows")
        Ws.append(W[:vocab_size])
        bs.append(None if b is None else b[:vocab_size])
    problem = make_problem(Ws, bs, hard=_hard_members(hard), soft=soft, dtype=dtype)
    if weights is not None:
        weights = jnp.asarray(weights, dtype)
    comb = bottleneck(problem, objective, weights=weights, rho=rho, lam=lam, solver=solver, **options)

    def init(batch_size: int):
        # BottleneckState carries the problem (an argument of the compiled loop, not a baked
        # constant).  A fresh copy: the decode loop donates its state, and the problem must
        # outlive a call.
        state = comb.init(batch_size)
        return state._replace(problem=jax.tree.map(jnp.copy, state.problem))

    def combine(logits, state):
        logp, state, sol = comb.combine(logits, state)
        info = BottleneckDecodeInfo(
            sol.status.astype(jnp.int32),
            sol.iterations.astype(jnp.float32),
            sol.primal_residual.astype(jnp.float32),
            sol.gap.astype(jnp.float32),
        )
        return logp, state, info

    return Combiner(init, combine)


def _register_builtin():
    from jaxens.combiners.averaging import logit_average, prob_average
    from jaxens.mixture import me
    from jaxens.objectives import OBJECTIVES

    register_combiner(
        "logit_average", lambda members, weights=None, temperature=1.0: logit_average(weights, temperature)
    )
    register_combiner("prob_average", lambda members, weights=None, temperature=1.0: prob_average(weights, temperature))
    register_combiner(
        "me",
        lambda members, weights=None, temperature=1.0, max_pending=8, per_member_truncation=False: me(
            weights, temperature=temperature, max_pending=max_pending, per_member_truncation=per_member_truncation
        ),
    )
    for objective in OBJECTIVES:
        register_combiner(
            f"bottleneck-{objective}",
            lambda members, objective=objective, **options: bottleneck_combiner(members, objective, **options),
        )


_register_builtin()
