r"""The cross-tokenizer decode loop: every member keeps its own token stream and KV cache.

The rows' state is **text** (bytes).  One step of a method (GaC, UniTE, DeePEn, ME, SAFE):

1. the method asks :meth:`CrossEngine.logprobs` for the members it needs; the engine first
   *syncs* each of them to the current text of every row: the tail of the text from the
   member's last word-start token is re-encoded (:func:`jaxens.vocab.align.retokenize_tail`),
   tokens that changed are retracted (their cache slots are masked out, ``kv_mask = False``) and
   the new ones are fed as one chunk through the member's KV cache; then the member's
   next-token log-probabilities :math:`\log \hat p_i \in \mathbb R^{B\times v_i}` are returned;
2. the method combines them into a common space (union vocabulary, main vocabulary, or one
   member's vocabulary) inside a jit-compiled function and samples with a
   :class:`jaxens.Sampler` (greedy or any truncation, applied to the combined distribution);
3. the sampled entry's bytes are appended to the row's text (``None`` = end of sequence).

Members not asked for in a step (ME, SAFE's verifiers) fall behind and catch up in one chunk when
next asked: the re-encoding is the same.

**Cache layout.**  All rows of a member write a chunk of ``T`` tokens at the same slot index (the
member contract); a row with fewer new tokens marks the rest of its slots empty.  Retracted tokens
stay in their slots, masked.  Positions count each row's *kept* tokens, so a retraction followed
by a re-feed gives exactly the logits of the re-encoded sequence.  Chunk lengths are bucketed
(1, 4, 16, 64, ...) and the cache grows by doubling, so a run compiles each member forward a few
times, never per step.

**Host side.**  Text re-encoding is host work by nature (tokenizers are host code); the member
forwards and the combiners are compiled.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxens.sampling import Sampler
from jaxens.vocab.align import Alignment, TokenizerView, align, retokenize_tail

CHUNK_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096)


def _bucket(n: int) -> int:
    for b in CHUNK_BUCKETS:
        if b >= n:
            return b
    raise ValueError(f"chunk of {n} tokens is longer than the largest bucket {CHUNK_BUCKETS[-1]}")


def check_member_vocab(member: Any, view: TokenizerView, index: int = 0) -> int:
    """The member's logit width; ``ValueError`` when its embedding table has fewer rows than the
    tokenizer has ids (logits would not cover the vocabulary)."""
    W, _ = member.unembedding()
    rows = int(W.shape[0])
    cfg_v = getattr(getattr(member, "config", None), "vocab_size", rows)
    if rows < view.vocab_size or cfg_v < view.vocab_size:
        raise ValueError(
            f"member {index} ({type(member).__name__}) has {rows} embedding rows (config.vocab_size {cfg_v}) but its "
            f"tokenizer has {view.vocab_size} ids; pass the tokenizer that belongs to this checkpoint"
        )
    return view.vocab_size


class _Forward:
    """One member's compiled chunk forward: ``(tokens, positions, cache, index, kv_mask, last) -> (log p, cache)``."""

    def __init__(self, member, vocab: int):
        self.graphdef, self.state = nnx.split(member)
        self.vocab = vocab
        try:
            self._member = weakref.ref(member)  # the forward cache must not keep the member alive
        except TypeError:
            self._member = lambda: member
        self.traces = 0

        def fwd(state, tokens, positions, cache, index, kv_mask, last):
            self.traces += 1
            model = nnx.merge(self.graphdef, state)
            logits, cache = model(tokens, positions, cache, index, kv_mask)
            lg = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, : self.vocab]
            return jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1), cache

        self.jit = jax.jit(fwd, donate_argnums=(3,))

    @property
    def member(self):
        return self._member()

    def __call__(self, *args):
        return self.jit(self.state, *args)


_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward_for(member, vocab: int) -> _Forward:
    """One compiled forward per (member, vocabulary width), shared by every decoder of that member
    (methods built on the same members reuse the compiled chunk sizes)."""
    try:
        per = _FORWARDS.setdefault(member, {})
    except TypeError:  # not weak-referenceable
        return _Forward(member, vocab)
    if vocab not in per:
        per[vocab] = _Forward(member, vocab)
    return per[vocab]


class _Stream:
    """Host bookkeeping of one member: token ids per row, their cache slots, the cache."""

    def __init__(self, fwd: _Forward, view: TokenizerView, cache_dtype=None):
        self.fwd, self.view, self.cache_dtype = fwd, view, cache_dtype
        self.forward_tokens = 0  # real tokens fed (prompt included)
        self.forward_calls = 0

    def start(self, prompts: Sequence[str], reserve: int, prompt_ids: Sequence[Sequence[int]] | None = None):
        """Prefill the prompts (``prompt_ids``: given ids instead of encoding ``prompts``)."""
        B = len(prompts)
        if prompt_ids is not None:
            if len(prompt_ids) != B or any(len(p) == 0 for p in prompt_ids):
                raise ValueError(f"prompt_ids must hold {B} non-empty id lists")
            self.prompt_ids = [list(p) for p in prompt_ids]
        else:
            self.prompt_ids = [self.view.encode_prompt(p) for p in prompts]
        P = max(len(p) for p in self.prompt_ids)
        T = _bucket(P)
        S = int(2 ** np.ceil(np.log2(max(T + reserve, 64))))
        # fresh buffers (a member may return the same zeros array for keys and values; the cache is donated)
        self.cache = jax.tree.map(jnp.copy, self.fwd.member.init_cache(B, S, self.cache_dtype))
        self.kv_mask = np.zeros((B, S), bool)
        self.slot = 0
        self.gen_ids = [[] for _ in range(B)]
        self.gen_slots = [[] for _ in range(B)]
        toks = np.zeros((B, T), np.int32)
        for b, p in enumerate(self.prompt_ids):
            toks[b, : len(p)] = p
            self.kv_mask[b, : len(p)] = True
        pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
        last = np.array([len(p) - 1 for p in self.prompt_ids], np.int32)
        self.logp = self._run(toks, pos, last, T)
        self.forward_tokens += sum(len(p) for p in self.prompt_ids)

    def _grow(self, need: int):
        S = self.kv_mask.shape[1]
        if need <= S:
            return
        S2 = S
        while S2 < need:
            S2 *= 2
        pad = [(0, 0), (0, 0), (0, S2 - S), (0, 0), (0, 0)]
        self.cache = type(self.cache)(*(jnp.pad(x, pad) for x in self.cache))
        self.kv_mask = np.pad(self.kv_mask, [(0, 0), (0, S2 - S)])

    def _run(self, toks, pos, last, T):
        self._grow(self.slot + T)
        logp, self.cache = self.fwd(
            jnp.asarray(toks), jnp.asarray(pos), self.cache, jnp.int32(self.slot), jnp.asarray(self.kv_mask),
            jnp.asarray(last),
        )
        self.slot += T
        self.forward_calls += 1
        return logp

    def sync(self, texts: Sequence[bytes]):
        """Bring every row's tokens to ``texts`` (the generated bytes); updates ``self.logp``."""
        B = len(texts)
        plans = []
        for b in range(B):
            keep, new = retokenize_tail(self.view, self.gen_ids[b], texts[b], 0)
            if keep < len(self.gen_ids[b]) and not new:
                # a retraction with nothing to feed: re-feed the last kept token for fresh logits
                if keep > 0:
                    keep -= 1
                    new = [self.gen_ids[b][keep]]
            plans.append((keep, new))
        self.feed(plans)

    def force(self, ids: Sequence[Sequence[int]]):
        """Teacher forcing: make row ``b``'s tokens exactly ``ids[b]`` (no re-encoding of the text;
        the pivot member of :func:`jaxens.harness.teacher_forcing.teacher_forced_log_probs`); updates ``self.logp``."""
        plans = []
        for b, want in enumerate(ids):
            have = self.gen_ids[b]
            c = 0
            while c < min(len(have), len(want)) and have[c] == want[c]:
                c += 1
            plans.append((c, list(want[c:])))
        self.feed(plans)

    def feed(self, plans: Sequence[tuple[int, Sequence[int]]]):
        """Per row ``(keep, new)``: retract ``gen_ids[b][keep:]`` and feed ``new`` (one chunk for all rows)."""
        B = len(plans)
        n_new = max(len(n) for _, n in plans)
        if n_new == 0 and all(k == len(self.gen_ids[b]) for b, (k, _) in enumerate(plans)):
            return
        T = _bucket(max(n_new, 1))
        self._grow(self.slot + T)
        toks = np.zeros((B, T), np.int32)
        pos = np.zeros((B, T), np.int32)
        last = np.zeros((B,), np.int32)
        fed = np.zeros((B,), bool)
        for b, (keep, new) in enumerate(plans):
            for s in self.gen_slots[b][keep:]:
                self.kv_mask[b, s] = False
            self.gen_ids[b] = self.gen_ids[b][:keep]
            self.gen_slots[b] = self.gen_slots[b][:keep]
            base = len(self.prompt_ids[b]) + keep
            pos[b] = base + np.arange(T)
            if new:
                toks[b, : len(new)] = new
                self.kv_mask[b, self.slot : self.slot + len(new)] = True
                self.gen_ids[b] += list(new)
                self.gen_slots[b] += list(range(self.slot, self.slot + len(new)))
                last[b] = len(new) - 1
                fed[b] = True
        if not fed.any():
            return
        logp = self._run(toks, pos, last, T)
        self.forward_tokens += int(sum(len(n) for _, n in plans))
        self.logp = jnp.where(jnp.asarray(fed)[:, None], logp, self.logp)


class CrossEngine:
    """State of a cross-tokenizer decode: the rows' texts and one :class:`_Stream` per member.

    Methods call :meth:`logprobs` (synced next-token log-probs of a member, ``(B, v_i)``) and
    :meth:`sample` (a compiled sampler call); see :func:`cross_generate`.
    """

    def __init__(self, streams, alignment: Alignment | None, sampler: Sampler, B: int):
        self.streams = streams
        self.alignment = alignment
        self.sampler = sampler
        self.B = B
        self.texts = [b""] * B
        self.active = np.ones((B,), bool)
        self._sample = jax.jit(lambda lp, key, mask: sampler(lp, key, mask))

    @property
    def num_members(self) -> int:
        return len(self.streams)

    def view(self, i: int) -> TokenizerView:
        return self.streams[i].view

    def logprobs(self, i: int) -> jax.Array:
        s = self.streams[i]
        s.sync(self.texts)
        return s.logp

    def sample(self, logp: jax.Array, key, mask=None) -> np.ndarray:
        return np.asarray(self._sample(logp, key, mask))


@dataclasses.dataclass(frozen=True)
class CrossOutput:
    """``texts[b]``: row ``b``'s generated text; ``finished[b]``: it ended with EOS; ``stats``:
    per-method diagnostics plus ``forward_tokens`` / ``forward_calls`` per member and timing."""

    texts: list
    finished: np.ndarray
    steps: int
    stats: dict


class CrossMethod:
    """A cross-vocabulary decoding method: ``setup(engine)`` once, ``step(engine, key)`` per step
    returning one piece per row (``bytes``; ``None`` = end of sequence) and a dict of counters."""

    needs_alignment = True

    def setup(self, engine: CrossEngine) -> None:  # pragma: no cover - interface
        pass

    def step(self, engine: CrossEngine, key) -> tuple[list, dict]:  # pragma: no cover - interface
        raise NotImplementedError


def text_mask(view: TokenizerView) -> np.ndarray:
    """Ids that may be sampled: tokens with text, and the EOS ids."""
    m = np.array([s is not None and len(s) > 0 for s in view.strings], bool)
    for e in view.eos_ids:
        m[e] = True
    return m


def id_pieces(view: TokenizerView, ids: np.ndarray) -> list:
    return [None if int(j) in view.eos_ids else (view.strings[int(j)] or b"") for j in ids]


class CrossDecoder:
    r"""Decode with members that have different tokenizers.

    Each step every member proposes :math:`\hat p_i` over its own vocabulary; the method maps
    them into a common space (GaC: the union vocabulary, :math:`p(u) = \sum_i w_i \hat p_i(u)`
    for the tokens :math:`u` each member holds), a token string is sampled, and every member
    re-encodes the text after its last stable token.  Example::

        dec = CrossDecoder([smol, gemma], [smol_tok, gemma_tok], GaC(), Sampler(greedy=True))
        print(dec.generate(["The capital of France is"], 24).texts[0])

    Args:
      members: NNX modules (:mod:`jaxens.models.base`).
      tokenizers: one per member (fast tokenizers, ``tokenizers.Tokenizer`` or
        :class:`~jaxens.vocab.align.TokenizerView`).
      method: a :class:`CrossMethod` (``gac``, ``unite``, ``deepen``, ``me_cross``, ``safe``).
      sampler: applied to the method's combined distribution (default plain sampling).
      alignment: a prebuilt :class:`~jaxens.vocab.align.Alignment` (reuse it across decoders).
    """

    def __init__(self, members, tokenizers, method: CrossMethod, sampler: Sampler | None = None, *,
                 alignment: Alignment | None = None, cache_dtype=None):
        members = list(members)
        if len(members) != len(tokenizers):
            raise ValueError(f"got {len(members)} members but {len(tokenizers)} tokenizers")
        if alignment is None and method.needs_alignment:
            alignment = align(tokenizers)
        views = list(alignment.views) if alignment is not None else [
            t if isinstance(t, TokenizerView) else TokenizerView(t) for t in tokenizers]
        self.members, self.views, self.alignment = members, views, alignment
        self.method = method
        self.sampler = sampler or Sampler()
        self.cache_dtype = cache_dtype
        self.fwds = [_forward_for(m, check_member_vocab(m, v, i)) for i, (m, v) in enumerate(zip(members, views))]
        self._setup_done = None

    def generate(self, prompts: Sequence[str], max_new_tokens: int, *, seed: int = 0, key=None,
                 callback=None) -> CrossOutput:
        """Generate up to ``max_new_tokens`` pieces per row; ``callback(step, texts)`` after every step."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        B = len(prompts)
        t0 = time.perf_counter()
        streams = [_Stream(f, v, self.cache_dtype) for f, v in zip(self.fwds, self.views)]
        for s in streams:
            s.start(prompts, reserve=4 * max_new_tokens + 16)
        eng = CrossEngine(streams, self.alignment, self.sampler, B)
        eng.max_new_tokens = max_new_tokens  # a method may plan ahead (SAFE drafts no more than this)
        self.method.setup(eng)
        key = jax.random.key(seed) if key is None else key
        finished = np.zeros((B,), bool)
        counts: dict = {}
        steps = 0
        for step in range(max_new_tokens):
            if not eng.active.any():
                break
            key, sub = jax.random.split(key)
            pieces, info = self.method.step(eng, sub)
            for k, v in info.items():
                counts[k] = counts.get(k, 0) + v
            texts = list(eng.texts)
            for b in range(B):
                if not eng.active[b]:
                    continue
                if pieces[b] is None:
                    eng.active[b] = False
                    finished[b] = True
                else:
                    texts[b] = texts[b] + pieces[b]
            eng.texts = texts
            steps += 1
            if callback is not None:
                callback(step, [t.decode("utf-8", "replace") for t in eng.texts])
        dt = time.perf_counter() - t0
        stats = dict(counts)
        stats.update(
            forward_tokens=[s.forward_tokens for s in streams],
            forward_calls=[s.forward_calls for s in streams],
            seconds=dt,
        )
        return CrossOutput([t.decode("utf-8", "replace") for t in eng.texts], finished, steps, stats)
