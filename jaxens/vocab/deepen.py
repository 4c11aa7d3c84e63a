r"""DeePEn: ensembling heterogeneous vocabularies in a relative (anchor) space.

**Relative representation.**  Member :math:`i` with input embeddings :math:`e_{ij}` (``V_i x d_i``)
and anchors :math:`a = 1..A` (tokens whose normalised string is in every vocabulary,
:class:`jaxens.vocab.align.Alignment`, same order for every member):

.. math::  R_i[j, a] = \mathrm{softmax}_a\big(s \cdot \cos(e_{ij}, e_{i a})\big),

each row a distribution over anchors (``scale`` :math:`s`; the published "temperature 100"
multiplies the cosines).  A next-token distribution :math:`p_i` maps to :math:`r_i = p_i R_i \in
\Delta_A`; the members' vectors are averaged, :math:`\bar r = \sum_i w_i r_i`.

**Inverse.**  The next-token logits :math:`z` of the main member (index ``main``) are searched so
that its relative vector matches the aggregate:

.. math::  \min_z\ \mathrm{KL}\big(\bar r \,\|\, \mathrm{softmax}(z) R_{\text{main}}\big),

from :math:`z_0` = the main member's logits, by ``steps`` AdamW steps (optax; learning rate
``lr`` with cosine decay; defaults 5 steps, 0.15).  With :math:`p = \mathrm{softmax}(z)`,
:math:`r = pR`, :math:`g = \bar r / r`: :math:`\partial L/\partial p = -R g` and
:math:`\nabla_z L = p \odot (-Rg) - p\,\langle p, -Rg\rangle`, computed in closed form.

**Memory.**  :math:`R` is never formed as a dense ``V x A`` matrix.  Two exact-up-to-rounding or
bounded forms:

* ``mode="chunked"``: rows of :math:`R` are recomputed in chunks of ``chunk`` tokens inside a
  ``lax.scan`` / ``fori_loop`` for each product :math:`pR` and :math:`Rg`; ``E`` is sliced in place
  (the last chunk is shifted back to end at row ``V``, its repeated rows masked), the anchors'
  scaled unit embeddings (one ``A x d`` buffer, shared by both products of every step) are the
  dot's left operand, and the default ``chunk`` (:func:`default_chunk`, ``2^18 / A``) keeps the
  ``chunk x A`` temporaries near 1 MiB.  The gradient is the closed form above (no autodiff, so no
  stored ``V x A`` residuals).  Peak memory: the arguments plus about two ``A x d`` buffers; same
  result as the dense form up to float rounding (tested against a float64 dense reference;
  ``benchmarks/deepen_memory.py`` measures <= 1/8 of the dense form's peak at ``V >= 16k``);
* ``mode="topk"``: only the ``k`` most likely tokens of each distribution enter (their rows of
  :math:`R`, ``B x k x A``); the relative vector is renormalised on that support, so
  :math:`\lVert r_{\text{topk}} - r\rVert_1 \le 2(1 - P_k)` where :math:`P_k` is the kept mass;
  the inverse updates the main member's logits on its top-``k`` support (others keep :math:`z_0`).

``dense_*`` functions build :math:`R` and exist as the reference for tests and the benchmark.
Source: SOURCES.md §3 (DeePEn).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from jaxens.combiners.base import check_weights, normalized_weights
from jaxens.vocab.cross_decode import CrossMethod, id_pieces, text_mask


def _unit(x: Array) -> Array:
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(n, 1e-12)


def relative_rows(E_rows: Float[Array, "... d"], Ea_unit: Float[Array, "A d"], scale: float) -> Float[Array, "... A"]:
    """Rows of :math:`R` for the given embedding rows (anchors' embeddings already unit-norm)."""
    return jax.nn.softmax(scale * (_unit(E_rows) @ Ea_unit.T), axis=-1)


def _anchors(E, anchor_ids, dtype, scale):
    """The anchors' unit embeddings times ``scale``, ``(A, d)``: the one ``A x d`` buffer of the
    chunked forms."""
    # the norms of all V rows (a V-vector) so that gather and scaling fuse into one A x d output
    inv = scale / jnp.maximum(jnp.linalg.norm(E.astype(dtype), axis=-1), 1e-12)
    return E[anchor_ids].astype(dtype) * inv[anchor_ids][:, None]


def _rows_t(E_rows, Ea_s, scale=None):
    """Rows of :math:`R` for ``E_rows`` (``c x d``) from :func:`_anchors`, transposed (``A x c``:
    the anchors' buffer is the dot's left operand, so XLA never transposes it)."""
    return jax.nn.softmax(jnp.einsum("ad,cd->ac", Ea_s, _unit(E_rows)), axis=0)


def _check(E, anchor_ids, p_width=None):
    if E.ndim != 2:
        raise ValueError(f"embeddings must have shape (V, d), got {E.shape}")
    if anchor_ids.ndim != 1 or anchor_ids.shape[0] == 0:
        raise ValueError(f"anchor_ids must be a non-empty 1-D index array, got shape {anchor_ids.shape}")
    if p_width is not None and p_width != E.shape[0]:
        raise ValueError(
            f"distribution has {p_width} entries but the embedding table has {E.shape[0]} rows; "
            "a member's vocabulary must match its embedding rows"
        )


# ---------------------------------------------------------------- dense reference


def dense_relative_matrix(E: Float[Array, "V d"], anchor_ids: Int[Array, " A"], scale: float = 100.0) -> Float[Array, "V A"]:
    """The dense :math:`R` (reference only: ``V x A``)."""
    _check(E, anchor_ids)
    return relative_rows(E, _unit(E[anchor_ids]), scale)


def dense_inverse(z0, target, E, anchor_ids, scale=100.0, steps=5, lr=0.15):
    """Reference inverse with the dense :math:`R` and autodiff (same optimiser as :func:`inverse`)."""
    R = dense_relative_matrix(E, anchor_ids, scale)

    def loss(z):
        r = jax.nn.softmax(z, axis=-1) @ R
        return jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - jnp.log(r)))

    opt = _optimizer(steps, lr)
    state = opt.init(z0)
    z = z0
    for _ in range(steps):
        g = jax.grad(loss)(z)
        upd, state = opt.update(g, state, z)
        z = optax.apply_updates(z, upd)
    return z


# ---------------------------------------------------------------- chunked products


def default_chunk(num_anchors: int) -> int:
    """Rows per chunk when none is given: ``2**18 / A`` clipped to ``[16, 1024]``, so a chunk's
    ``chunk x A`` float32 temporaries stay near 1 MiB (below the ``A x d`` anchor buffer)."""
    return int(min(1024, max(16, 2**18 // max(int(num_anchors), 1))))


def _chunk_plan(V: int, chunk: int | None, A: int = 1):
    """``(c, n, starts)``: ``n`` row chunks of ``c = min(chunk, V)`` rows starting at ``starts``; the last
    chunk is shifted back to end at row ``V`` (no padded copy of ``E``), its rows already covered
    by the previous chunk are masked where they would count twice."""
    if chunk is None:
        chunk = default_chunk(A)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    c = min(int(chunk), V)
    n = -(-V // c)
    return c, n, jnp.minimum(jnp.arange(n, dtype=jnp.int32) * c, V - c)


def _pR(p, E, Ea, chunk):
    V = E.shape[0]
    c, n, starts = _chunk_plan(V, chunk, Ea.shape[0])

    def body(acc, i):
        s = starts[i]
        e = jax.lax.dynamic_slice_in_dim(E, s, c, axis=0).astype(p.dtype)
        pp = jax.lax.dynamic_slice_in_dim(p, s, c, axis=1)
        pp = jnp.where((s + jnp.arange(c) >= i * c)[None, :], pp, 0.0)  # rows of the previous chunk count once
        return acc + jnp.einsum("bc,ac->ba", pp, _rows_t(e, Ea)), None

    out, _ = jax.lax.scan(body, jnp.zeros((p.shape[0], Ea.shape[0]), p.dtype), jnp.arange(n))
    return out


def _Rg(g, E, Ea, chunk):
    V = E.shape[0]
    c, n, starts = _chunk_plan(V, chunk, Ea.shape[0])

    def body(i, out):
        e = jax.lax.dynamic_slice_in_dim(E, starts[i], c, axis=0).astype(g.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.einsum("ba,ac->bc", g, _rows_t(e, Ea)), starts[i], axis=1)

    return jax.lax.fori_loop(0, n, body, jnp.zeros((g.shape[0], V), g.dtype))


def relative_chunked(p: Float[Array, "B V"], E: Float[Array, "V d"], anchor_ids: Int[Array, " A"],
                     scale: float = 100.0, chunk: int | None = None) -> Float[Array, "B A"]:
    """:math:`pR` with :math:`R` recomputed in row chunks (temporaries: the ``A x d`` scaled unit
    anchors and ``O(chunk x A)``; ``E`` is sliced in place, never copied)."""
    _check(E, anchor_ids, p.shape[-1])
    return _pR(p, E, _anchors(E, anchor_ids, p.dtype, scale), chunk)


def relative_rmatvec_chunked(g: Float[Array, "B A"], E: Float[Array, "V d"], anchor_ids: Int[Array, " A"],
                             scale: float = 100.0, chunk: int | None = None) -> Float[Array, "B V"]:
    """:math:`R g` (``(B, V)``) with :math:`R` recomputed in row chunks (written in place)."""
    _check(E, anchor_ids)
    return _Rg(g, E, _anchors(E, anchor_ids, g.dtype, scale), chunk)


def relative_topk(p: Float[Array, "B V"], E: Float[Array, "V d"], anchor_ids: Int[Array, " A"],
                  scale: float = 100.0, k: int = 256) -> tuple[Float[Array, "B A"], Float[Array, " B"]]:
    """:math:`pR` on the top-``k`` support of each row, renormalised; also the kept mass :math:`P_k`
    (``||r_topk - r||_1 <= 2 (1 - P_k)``)."""
    _check(E, anchor_ids, p.shape[-1])
    k = min(k, p.shape[-1])
    Ea = _unit(E[anchor_ids]).astype(p.dtype)
    val, idx = jax.lax.top_k(p, k)
    Rk = relative_rows(E.astype(p.dtype)[idx], Ea, scale)  # (B, k, A)
    mass = jnp.sum(val, axis=-1)
    r = jnp.einsum("bk,bka->ba", val, Rk) / jnp.maximum(mass, 1e-30)[:, None]
    return r, mass


# ---------------------------------------------------------------- the inverse


def _optimizer(steps: int, lr: float):
    return optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)))


def _kl(target, r):
    t = jnp.maximum(target, 1e-30)
    return jnp.sum(jnp.where(target > 0, target * (jnp.log(t) - jnp.log(jnp.maximum(r, 1e-30))), 0.0), axis=-1)


def inverse(z0: Float[Array, "B V"], target: Float[Array, "B A"], E: Float[Array, "V d"], anchor_ids: Int[Array, " A"],
            scale: float = 100.0, steps: int = 5, lr: float = 0.15, mode: str = "chunked", chunk: int | None = None,
            k: int = 256) -> tuple[Float[Array, "B V"], Float[Array, " B"]]:
    """AdamW search of the main member's logits; returns ``(z, final KL)``.  See the module docstring."""
    _check(E, anchor_ids, z0.shape[-1])
    if target.shape != (z0.shape[0], anchor_ids.shape[0]):
        raise ValueError(f"target must have shape {(z0.shape[0], anchor_ids.shape[0])}, got {target.shape}")
    opt = _optimizer(steps, lr)
    if mode == "chunked":
        Ea = _anchors(E, anchor_ids, z0.dtype, scale)  # once, shared by both products of every step

        def grad(z):
            p = jax.nn.softmax(z, axis=-1)
            r = _pR(p, E, Ea, chunk)
            dp = -_Rg(target / jnp.maximum(r, 1e-30), E, Ea, chunk)
            return p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)), r

        def body(_, carry):
            z, st = carry
            g, _ = grad(z)
            upd, st = opt.update(g, st, z)
            return optax.apply_updates(z, upd), st

        z, _ = jax.lax.fori_loop(0, steps, body, (z0, opt.init(z0)))
        r = _pR(jax.nn.softmax(z, axis=-1), E, Ea, chunk)
        return z, _kl(target, r)
    if mode == "topk":
        k = min(k, z0.shape[-1])
        Ea = _unit(E[anchor_ids]).astype(z0.dtype)
        zk, idx = jax.lax.top_k(z0, k)
        Rk = relative_rows(E.astype(z0.dtype)[idx], Ea, scale)  # (B, k, A)

        def loss(zs):
            r = jnp.einsum("bk,bka->ba", jax.nn.softmax(zs, axis=-1), Rk)
            return jnp.sum(_kl(target, r))

        def body(_, carry):
            zs, st = carry
            upd, st = opt.update(jax.grad(loss)(zs), st, zs)
            return optax.apply_updates(zs, upd), st

        zs, _ = jax.lax.fori_loop(0, steps, body, (zk, opt.init(zk)))
        r = jnp.einsum("bk,bka->ba", jax.nn.softmax(zs, axis=-1), Rk)
        # the top-k entries move; the tail keeps its logits relative to the (shifted) support
        shift = jax.nn.logsumexp(zs, axis=-1) - jax.nn.logsumexp(zk, axis=-1)
        z = (z0 + shift[:, None]).at[jnp.arange(z0.shape[0])[:, None], idx].set(zs)
        return z, _kl(target, r)
    raise ValueError(f"mode must be 'chunked' or 'topk', got {mode!r}")


class DeePEnInfo(NamedTuple):
    kl0: Float[Array, " B"]  # KL(aggregate || main's own relative vector)
    kl: Float[Array, " B"]  # after the search
    kept_mass: Float[Array, " B"]  # top-k mode: smallest kept mass over members (1 for chunked)


def deepen_combine(logps, embeddings, anchor_ids, weights, *, main=0, scale=100.0, steps=5, lr=0.15,
                   mode="topk", chunk=None, k=256):
    """DeePEn for one step: members' log-probs ``(B, v_i)`` -> log-probs on the main vocabulary."""
    if not (len(logps) == len(embeddings) == len(anchor_ids)):
        raise ValueError(f"{len(logps)} log-probs, {len(embeddings)} embedding tables, {len(anchor_ids)} anchor sets")
    A = anchor_ids[0].shape[0]
    if any(a.shape != (A,) for a in anchor_ids):
        raise ValueError(f"every member needs the same anchors, got shapes {[a.shape for a in anchor_ids]}")
    rs, masses = [], []
    for lp, E, a in zip(logps, embeddings, anchor_ids):
        _check(E, a, lp.shape[-1])
        p = jnp.exp(lp)
        if mode == "topk":
            r, m = relative_topk(p, E, a, scale, k)
        else:
            r, m = relative_chunked(p, E, a, scale, chunk), jnp.ones(p.shape[:1], p.dtype)
        rs.append(r)
        masses.append(m)
    target = sum(w * r for w, r in zip(weights, rs))
    z0 = logps[main]
    z, kl = inverse(z0, target, embeddings[main], anchor_ids[main], scale, steps, lr, mode, chunk, k)
    info = DeePEnInfo(_kl(target, rs[main]), kl, jnp.min(jnp.stack(masses), axis=0))
    return jax.nn.log_softmax(z, axis=-1), info


@dataclasses.dataclass
class DeePEn(CrossMethod):
    """DeePEn in the cross-tokenizer loop: every member every step, sample on the main vocabulary.

    ``max_anchors`` caps the anchors (the published configs use up to 16,000; the first anchors in
    the main member's id order are kept); embeddings are each member's ``unembedding()`` rows
    (tied input embeddings for SmolLM2 and Gemma 3; cosines ignore Gemma's input scaling).
    """

    weights: tuple | None = None
    main: int = 0
    scale: float = 100.0
    steps: int = 5
    lr: float = 0.15
    mode: str = "topk"
    chunk: int | None = None
    k: int = 256
    max_anchors: int | None = 8192

    def __post_init__(self):
        check_weights(self.weights, None, owner="deepen")

    def setup(self, eng):
        n = eng.num_members
        w = normalized_weights(self.weights, n, np.float64, owner="deepen")
        if self.mode not in ("topk", "chunked"):
            raise ValueError(f"mode must be 'topk' or 'chunked', got {self.mode!r}")
        al = eng.alignment
        A = al.num_anchors if self.max_anchors is None else min(al.num_anchors, self.max_anchors)
        self._w = jnp.asarray(w, jnp.float32)
        self._anchors = tuple(jnp.asarray(a[:A]) for a in al.anchor_ids)
        embs = []
        for i, s in enumerate(eng.streams):
            W, _ = s.fwd.member.unembedding()
            V = s.view.vocab_size
            embs.append(jnp.asarray(W if W.shape[0] == V else W[:V], jnp.float32))  # no copy when it fits
        self._E = tuple(embs)
        mv = eng.view(self.main)
        self._mask = jnp.broadcast_to(jnp.asarray(text_mask(mv)), (eng.B, mv.vocab_size))
        kw = dict(main=self.main, scale=self.scale, steps=self.steps, lr=self.lr, mode=self.mode, chunk=self.chunk,
                  k=self.k)
        self._fn = jax.jit(lambda lps, E, a, w: deepen_combine(lps, E, a, w, **kw))

    def step(self, eng, key):
        lps = [eng.logprobs(i) for i in range(eng.num_members)]
        logp, info = self._fn(lps, self._E, self._anchors, self._w)
        ids = eng.sample(logp, key, self._mask)
        act = eng.active
        return id_pieces(eng.view(self.main), ids), {
            "positions": int(act.sum()),
            "kl_before": float(np.asarray(info.kl0)[act].sum()),
            "kl_after": float(np.asarray(info.kl)[act].sum()),
        }
