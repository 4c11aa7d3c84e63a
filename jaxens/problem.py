r"""The softmax-bottleneck problem: everything that depends on the members' unembeddings alone.

Member :math:`i` has unembedding :math:`W_i \in \mathbb{R}^{v \times d_i}` (and maybe a bias
:math:`b_i \in \mathbb{R}^v`); its next-token distribution is
:math:`\hat p_i = \mathrm{softmax}(W_i h_i + b_i)`.  Stack the columns

.. math::  A = [\,W_1\ b_1 \mid W_2\ b_2 \mid \dots \mid W_n\ b_n\,] \in \mathbb{R}^{v \times D},
           \qquad m = [\,A_1^\top \hat p_1;\ \dots;\ A_n^\top \hat p_n\,] \in \mathbb{R}^{D}.

The bottleneck feasible set (Finlayson, "The right way to ensemble language models") is

.. math::  \mathcal{F} = \{\,p \in \Delta_v : A_i^\top p = A_i^\top \hat p_i\ \ \forall i \in H\,\}

for the *hard* members :math:`H`; *soft* members :math:`S` add
:math:`\sum_{i\in S} \tfrac{\rho_i}{2}\lVert A_i^\top p - m_i\rVert^2` to the objective instead.

A :class:`BottleneckProblem` is built once per ensemble (eagerly, in numpy) and reused by every
step and every batch row.  :func:`make_problem` holds one ``v x D`` copy of ``A`` in the working
dtype plus the basis ``Q``: the Gram matrices and the basis are accumulated in float64 over row
blocks of ``A`` (about :data:`ROW_BLOCK_BYTES` each), never over a float64 copy of ``A``.  It caches

* ``A`` (``v x D``) in the working dtype, and each member's column slice;
* ``A_con``: a contiguous copy of the *constrained* (hard and soft) members' columns, when
  some member is unconstrained (``None`` otherwise: then they are all of ``A``).  A column
  slice of a row-major ``v x D`` matrix is a strided copy, and XLA does not hoist it out of a
  ``while_loop`` whose carry holds the problem (the decode loop): every per-step product with
  the constrained columns reads ``A_con`` (or ``A``) whole and slices the small result instead
  (see :meth:`BottleneckProblem.moments`, :meth:`BottleneckProblem.hard_products`);
* ``Q`` (``v x r``): an orthonormal basis of :math:`\mathrm{span}[A_H, \mathbf 1]` with its
  numerical rank ``r`` (duplicated or rank-deficient ``W`` are handled here, once);
* ``T_pinv`` (``r x (D_H + 1)``): maps the hard moments :math:`[m_H; 1]` to
  :math:`\beta = Q^\top p` for any feasible :math:`p` (the equality constraints in the
  orthonormal basis read :math:`Q^\top p = \beta`);
* Lipschitz constants :math:`\lambda_{\max}(A_H^\top A_H)` and :math:`\lambda_{\max}(A_i^\top A_i)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BottleneckProblem:
    r"""Static-per-ensemble data of the bottleneck problem (a pytree; shapes in the fields).

    With :math:`A = [W_1 | \dots | W_n] \in \mathbb R^{v\times D}` (a bias adds a column) and
    the hard members' columns :math:`A_H`, the feasible set of a row is
    :math:`\{p \in \Delta_v : A_H^\top p = m_H\}`; ``Q`` is an orthonormal basis of
    :math:`\operatorname{span}[A_H, \mathbf 1]` (rank ``rank``), so the constraints read
    :math:`Q^\top p = \beta(m)`.  Everything here depends on the :math:`W_i` alone and is built
    once by :func:`make_problem`; per-row data (moments, objective) are solver arguments.
    """

    # JAX rebuilds pytrees through __init__ with placeholder leaves (object(), ShapeDtypeStruct,
    # PartitionSpec): runtime type checkers (jaxtyping's import hook) must skip __init__.
    __no_type_check__ = True
    A: Float[Array, "v D"]
    Q: Float[Array, "v r"]
    T_pinv: Float[Array, "r Dh1"]
    lipschitz_hard: Float[Array, ""]
    lipschitz_members: Float[Array, " n"]
    member_cols: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    hard: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    soft: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    # A[:, columns(constrained)], contiguous; None when every member is constrained.  Replace
    # it together with A (``with_A``); it is a cache, not an independent parameter.
    A_con: Float[Array, "v Dc"] | None = None

    # ----- static helpers (shapes only; safe at trace time) -----
    @property
    def vocab_size(self) -> int:
        return int(self.A.shape[0])

    @property
    def num_members(self) -> int:
        return len(self.member_cols)

    @property
    def rank(self) -> int:
        """Numerical rank of ``[A_H, 1]`` (columns of ``Q``)."""
        return int(self.Q.shape[1])

    def member_slice(self, i: int) -> slice:
        start = sum(self.member_cols[:i])
        return slice(start, start + self.member_cols[i])

    def columns(self, members: Sequence[int]) -> np.ndarray:
        """Static integer indices of the columns of ``A`` that belong to ``members``."""
        idx = [np.arange(self.member_slice(i).start, self.member_slice(i).stop) for i in members]
        return np.concatenate(idx) if idx else np.zeros((0,), np.int64)

    @property
    def constrained(self) -> tuple[int, ...]:
        """The members whose moments any objective reads: ``hard`` and ``soft``, sorted."""
        return tuple(sorted(set(self.hard) | set(self.soft)))

    @property
    def A_constrained(self) -> Float[Array, "v Dc"]:
        """The constrained members' columns of ``A``: ``A_con``, or ``A`` when every member is
        constrained (or none is: then nothing reads them)."""
        return self.A if self.A_con is None else self.A_con

    def _block_index(self, members: Sequence[int]) -> tuple[Any, dict[int, slice]]:
        """``(M, {i: columns of member i in M})`` with ``M`` ``A_constrained`` when it holds
        every member in ``members``, else ``A``."""
        members = tuple(members)
        if self.A_con is not None and set(members) <= set(self.constrained):
            M, order = self.A_con, self.constrained
        else:
            M, order = self.A, tuple(range(self.num_members))
        where, start = {}, 0
        for i in order:
            where[i] = slice(start, start + self.member_cols[i])
            start += self.member_cols[i]
        return M, where

    def A_of(self, members: Sequence[int]) -> Float[Array, "v Dm"]:
        """``A`` restricted to the columns of ``members`` (static slicing; no copy when
        ``members`` are all members or exactly the constrained ones)."""
        members = tuple(members)
        if members == tuple(range(self.num_members)):
            return self.A
        if members and members == self.constrained:
            return self.A_constrained
        M, where = self._block_index(members)
        return jnp.concatenate([M[:, where[i]] for i in members], axis=1)

    @property
    def A_hard(self) -> Float[Array, "v Dh"]:
        return self.A_of(self.hard)

    def _hard_in_constrained(self) -> Any:
        """Static index of the hard columns within ``A_constrained`` (a slice when contiguous)."""
        _, where = self._block_index(self.constrained)
        parts = [np.arange(where[i].start, where[i].stop) for i in self.hard]
        idx = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
        if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
            return slice(int(idx[0]), int(idx[0]) + idx.size)
        return idx

    # ----- per-row helpers (traceable) -----
    def hard_products(self, x: Float[Array, "*B v"]) -> Float[Array, "*B Dh"]:
        """``A_H^T x`` as one pass over ``A_constrained`` (no strided copy of ``A_H``)."""
        return (x @ self.A_constrained)[..., self._hard_in_constrained()]

    def moments(
        self, probs: Float[Array, "*B n v"], members: Sequence[int] | None = None
    ) -> Float[Array, "*B D"]:
        """``m = [A_1^T p_1; ...; A_n^T p_n]`` for member distributions ``probs``.

        ``members``: compute only these members' blocks and leave the others 0 (default all).
        The solvers read only the constrained members' moments (the others have weight 0):
        with ``members=problem.constrained`` an unconstrained member (the KL prior, say) costs
        no read of its unembedding.  The blocks come from one product ``P_S M`` (``P_S`` the
        requested members' rows, ``M`` = ``A_constrained`` or ``A``, read once whole) and
        static slices of that small result: a matrix-matrix product with a few rows costs
        about the memory pass of one mat-vec, where slicing ``A`` by columns would copy it.
        """
        if probs.shape[-2:] != (self.num_members, self.vocab_size):
            raise ValueError(
                f"probs must have shape (..., n={self.num_members}, v={self.vocab_size}), "
                f"got {probs.shape}"
            )
        members = tuple(range(self.num_members)) if members is None else tuple(sorted(set(members)))
        dtype = jnp.result_type(probs.dtype, self.A.dtype)
        if not members:
            return jnp.zeros(probs.shape[:-2] + (sum(self.member_cols),), dtype)
        M, where = self._block_index(members)
        prods = probs[..., list(members), :] @ M  # (*B, |S|, cols of M)
        row = {i: k for k, i in enumerate(members)}
        parts = [
            prods[..., row[i], where[i]]
            if i in row
            else jnp.zeros(probs.shape[:-2] + (self.member_cols[i],), dtype)
            for i in range(self.num_members)
        ]
        return jnp.concatenate(parts, axis=-1)

    def with_A(self, A: Float[Array, "v D"], **changes: Any) -> "BottleneckProblem":
        """``dataclasses.replace(self, A=A, ...)`` with the ``A_con`` cache rebuilt from ``A``."""
        A_con = None if self.A_con is None else A[:, self.columns(self.constrained)]
        return dataclasses.replace(self, A=A, A_con=A_con, **changes)

    def hard_moments(self, m: Float[Array, "*B D"]) -> Float[Array, "*B Dh"]:
        return m[..., self.columns(self.hard)]

    def beta(self, m: Float[Array, "*B D"]) -> Float[Array, "*B r"]:
        """Right-hand side of the hard constraints in the orthonormal basis: ``Q^T p = beta``."""
        mh = self.hard_moments(m)
        ones = jnp.ones(mh.shape[:-1] + (1,), mh.dtype)
        return jnp.concatenate([mh, ones], axis=-1) @ self.T_pinv.T

    def hard_residual(self, p: Float[Array, "*B v"], m: Float[Array, "*B D"]) -> Float[Array, "*B"]:
        """``||A_H^T p - m_H||_inf`` (0 when there are no hard members)."""
        if not self.hard:
            return jnp.zeros(p.shape[:-1], p.dtype)
        return jnp.max(jnp.abs(self.hard_products(p) - self.hard_moments(m)), axis=-1)


ROW_BLOCK_BYTES = 1 << 25  # float64 bytes of one row block of A in make_problem's passes


def _host_rows(x: Any) -> Any:
    """A row-sliceable host view of ``x`` without a full copy: numpy as is, a CPU jax array as a
    numpy view of its buffer; other jax arrays stay on their device (sliced block by block)."""
    if isinstance(x, jax.Array):
        if all(d.platform == "cpu" for d in x.devices()):
            return np.asarray(x)
        return x
    return np.asarray(x)


def _rows(x: Any, r0: int, r1: int) -> np.ndarray:
    return np.asarray(jax.device_get(x[r0:r1])) if isinstance(x, jax.Array) else x[r0:r1]


def _row_blocks(v: int, width: int):
    step = max(256, ROW_BLOCK_BYTES // (8 * max(1, width)))
    return [(r0, min(v, r0 + step)) for r0 in range(0, v, step)]


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    from jaxens.models.assemble import aligned_empty  # jax adopts aligned host buffers on the CPU

    return aligned_empty(shape, dtype)


def make_problem(
    unembeddings: Sequence[Any],
    biases: Sequence[Any | None] | None = None,
    *,
    hard: Sequence[int] | str | None = "all",
    soft: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    rank_rtol: float = 1e-12,
) -> BottleneckProblem:
    """Build the per-ensemble bottleneck data once (eagerly; not inside ``jit``).

    Example::

        problem = make_problem([W1, W2], hard=(0,), soft=(1,))   # W_i: (v, d_i)
        comb = jaxens.bottleneck(problem, "kl", rho=10.0)

    Args:
      unembeddings: one ``(v, d_i)`` matrix per member (the rows of the output embedding).
      biases: one ``(v,)`` vector or ``None`` per member (an unembedding bias adds a column).
      hard: members whose moments are exact constraints: ``"all"`` (the blog's problem),
        a sequence of member indices (e.g. ``(best,)``, always feasible), or ``None``/``()``.
      soft: members whose moments enter as penalties with weights ``rho_i`` given per call.
      dtype: working dtype of the cached matrices (float32 default; float64 needs
        ``jax.config.update("jax_enable_x64", True)``).
      rank_rtol: eigenvalues of the Gram matrix of ``[A_H, 1]`` below ``rank_rtol * lambda_max``
        (singular values below ``sqrt(rank_rtol) * s_max``) are treated as zero when building
        ``Q`` (duplicated / rank-deficient members).

    Raises:
      ValueError: on mismatched vocabulary sizes, wrong bias shapes, bad member indices,
        a member listed both hard and soft, or non-finite unembeddings.
    """
    if len(unembeddings) == 0:
        raise ValueError("make_problem needs at least one member unembedding, got none")
    Ws = [_host_rows(W) for W in unembeddings]
    for i, W in enumerate(Ws):
        if W.ndim != 2:
            raise ValueError(f"unembedding {i} must be a (v, d) matrix, got shape {W.shape}")
        finite = jnp.isfinite(W).all() if isinstance(W, jax.Array) else all(
            np.isfinite(W[r0:r1]).all() for r0, r1 in _row_blocks(W.shape[0], W.shape[1]))
        if not bool(finite):
            raise ValueError(f"unembedding {i} contains NaN or inf; check the checkpoint")
    v = Ws[0].shape[0]
    for i, W in enumerate(Ws):
        if W.shape[0] != v:
            raise ValueError(
                f"members have different vocabulary sizes: unembedding 0 has shape {tuple(Ws[0].shape)}, "
                f"unembedding {i} has shape {tuple(W.shape)}; the bottleneck combiner needs a shared "
                "vocabulary (use jaxens.vocab for cross-tokenizer ensembles)"
            )
    n = len(Ws)
    if biases is None:
        biases = [None] * n
    if len(biases) != n:
        raise ValueError(f"got {n} unembeddings but {len(biases)} biases; pass None for no bias")
    bs = []
    for i, b in enumerate(biases):
        if b is not None:
            b = np.asarray(jax.device_get(b), dtype=np.float64)
            if b.shape != (v,):
                raise ValueError(f"bias {i} must have shape ({v},), got {b.shape}")
        bs.append(b)
    member_cols = tuple(int(W.shape[1]) + (b is not None) for W, b in zip(Ws, bs))
    starts = np.cumsum((0,) + member_cols)
    D = int(starts[-1])

    if isinstance(hard, str):
        if hard != "all":
            raise ValueError(f"hard must be 'all', a sequence of member indices or None, got {hard!r}")
        hard_t = tuple(range(n))
    else:
        hard_t = tuple(int(i) for i in (hard or ()))
    soft_t = tuple(int(i) for i in (soft or ()))
    for name, idx in (("hard", hard_t), ("soft", soft_t)):
        for i in idx:
            if not 0 <= i < n:
                raise ValueError(f"{name} member index {i} out of range for {n} members")
        if len(set(idx)) != len(idx):
            raise ValueError(f"{name} member indices repeat: {idx}")
    if set(hard_t) & set(soft_t):
        raise ValueError(
            f"members {sorted(set(hard_t) & set(soft_t))} are both hard and soft; choose one"
        )

    # A in the working dtype, filled member by member and row block by row block: the only
    # v x D copy (the members' own unembeddings aside).  Everything else comes from D x D Gram
    # matrices accumulated in float64 over row blocks of A (never an SVD of a v x D matrix).
    np_dtype = np.dtype(dtype)
    A = _aligned_empty((v, D), np_dtype)
    for i, (W, b) in enumerate(zip(Ws, bs)):
        c0, d_i = int(starts[i]), int(W.shape[1])
        for r0, r1 in _row_blocks(v, d_i):
            A[r0:r1, c0:c0 + d_i] = _rows(W, r0, r1)
        if b is not None:
            A[:, c0 + d_i] = b
    del Ws
    blocks = _row_blocks(v, D)
    hard_cols = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i in hard_t]
    ) if hard_t else np.zeros((0,), np.int64)
    G = np.zeros((D, D))
    colsum = np.zeros(D)
    for r0, r1 in blocks:  # pass 1: G = A^T A, A^T 1
        Ab = A[r0:r1].astype(np.float64)
        G += Ab.T @ Ab
        colsum += Ab.sum(axis=0)
    del Ab

    contiguous = hard_cols.size > 0 and np.array_equal(hard_cols, np.arange(hard_cols[0], hard_cols[0] + hard_cols.size))
    hard_idx = slice(int(hard_cols[0]), int(hard_cols[0]) + hard_cols.size) if contiguous else hard_cols

    def c_rows(r0, r1):  # rows of C = [A_H, 1] in float64 (one buffer)
        Cb = np.empty((r1 - r0, hard_cols.size + 1))
        Cb[:, :-1] = A[r0:r1, hard_idx]
        Cb[:, -1] = 1.0
        return Cb

    GC = np.block([[G[np.ix_(hard_cols, hard_cols)], colsum[hard_cols, None]],
                   [colsum[None, hard_cols], np.array([[float(v)]])]])
    lip_h = float(np.linalg.eigvalsh(G[np.ix_(hard_cols, hard_cols)])[-1]) if hard_t else 0.0
    lip_m = np.array([np.linalg.eigvalsh(G[a:b, a:b])[-1] for a, b in zip(starts[:-1], starts[1:])])
    del G  # D x D float64 temporaries are freed as soon as they are used
    lam, V = np.linalg.eigh(GC)
    keep = lam > max(lam[-1], 1e-300) * max(rank_rtol, 1e-12)
    R = V[:, keep] / np.sqrt(lam[keep])  # Q0 = C R
    del V
    # one re-orthonormalisation step (the Gram route squares the condition number):
    # Q = Q0 (Q0^T Q0)^{-1/2} = C R2, with Q0^T Q0 accumulated over row blocks (pass 2)
    M = np.zeros((R.shape[1], R.shape[1]))
    for r0, r1 in blocks:
        Qb = c_rows(r0, r1) @ R
        M += Qb.T @ Qb
    w, U = np.linalg.eigh(M)
    R2 = R @ (U / np.sqrt(w)) @ U.T
    r = R.shape[1]
    del M, U, R
    Q = _aligned_empty((v, r), np_dtype)
    T = np.zeros((r, GC.shape[0]))
    for r0, r1 in blocks:  # pass 3: Q = C R2 (stored in the working dtype), T = Q^T C
        Cb = c_rows(r0, r1)
        Qb = Cb @ R2
        T += Qb.T @ Cb
        Q[r0:r1] = Qb
    del Cb, Qb
    T_pinv = np.linalg.pinv(T.T, rcond=1e-12)  # beta = pinv(T^T) [m_h; 1]; C = Q T on the retained subspace
    cast = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731
    con = sorted(set(hard_t) | set(soft_t))
    A_con = None
    if len(con) not in (0, n):
        con_cols = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in con])
        A_con = _aligned_empty((v, con_cols.size), np_dtype)
        for r0, r1 in blocks:
            A_con[r0:r1] = A[r0:r1, con_cols]
        A_con = jax.device_put(A_con)
    return BottleneckProblem(
        A_con=A_con,
        A=jax.device_put(A),  # adopted without a copy on the CPU (aligned host buffers)
        Q=jax.device_put(Q),
        T_pinv=cast(T_pinv),
        lipschitz_hard=cast(lip_h),
        lipschitz_members=cast(lip_m),
        member_cols=member_cols,
        hard=hard_t,
        soft=soft_t,
    )
