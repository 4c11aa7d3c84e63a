r"""Running jaxens on a device mesh with JAX's own sharding (``jax.sharding``; GSPMD).

Three mesh axes, each optional, named by a :class:`ShardingConfig`:

* ``batch``: data parallelism.  Prompts / member logits ``(B, v)`` are split over rows; every
  row's decoding state (KV caches, token buffer, solver warm starts) lives on the devices of
  its rows.  ``B`` must be a multiple of the axis size.
* ``vocab``: the bottleneck problem's ``v x D`` matrices (``A``, ``Q``) and every ``(B, v)``
  vector are split over tokens.  Each solver iteration's matrix products
  :math:`A^\top p = \sum_{\text{shards } s} A_s^\top p_s` become a local product plus an
  all-reduce of a length-``D`` vector, and :math:`A z` stays local, so ``v x D`` never has to
  fit on one device: per device it is ``(v / |vocab|) x D``.  Reductions over ``v``
  (``logsumexp``, norms, ``max``) are all-reduces of scalars.  A ``v`` that is not a multiple of
  the axis size is padded: the pad rows of ``A``/``Q`` are zero and the pad tokens get
  ``-inf`` logits, so every objective gives them probability 0 and the real tokens the same
  distribution as the unpadded problem (:func:`pad_problem`).
* ``model``: tensor parallelism for members too large for one device: member parameters are
  placed with a :class:`~jax.sharding.NamedSharding` per array (:func:`shard_params`), and
  GSPMD propagates the sharding through the forward pass.

Nothing here changes the arithmetic: a sharded run computes the single-device result up to the
order of floating-point reductions (tested to 1e-5 in float32 on 1..8 devices,
``tests/decode/test_sharding.py``).  Entry points:

* :func:`make_mesh` / :class:`ShardingConfig` - the mesh and which axis does what (validated);
* :func:`shard_problem`, :func:`shard_logits` - place a problem / member logits on the mesh;
* :func:`sharded_bottleneck` - the bottleneck combiner on a mesh (pads ``v`` when needed);
* :class:`ShardedDecoder` - :class:`jaxens.Decoder` with batch-sharded state and
  replicated or model-sharded members.

Several hosts: call :func:`jax.distributed.initialize` first; ``jax.devices()`` is then the
global device list and the same code runs on every process (``docs/sharding.md``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

from jaxens.combiners.base import Combiner
from jaxens.decode import Decoder, DecodeState
from jaxens.models.base import KVCache
from jaxens.problem import BottleneckProblem

AXIS_ROLES = ("batch_axis", "vocab_axis", "model_axis")

# rule(path, array) -> PartitionSpec for one member parameter
ParamRule = Callable[[tuple, Any], P]


# ---------------------------------------------------------------- mesh and config


def make_mesh(batch: int = 1, vocab: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(batch, vocab, model)`` mesh over the first ``batch * vocab * model`` devices.

    Axes of size 1 are kept (a :class:`ShardingConfig` with default names then fits any such
    mesh).  ``devices`` defaults to :func:`jax.devices` (all processes' devices after
    :func:`jax.distributed.initialize`).
    """
    sizes = (int(batch), int(vocab), int(model))
    if min(sizes) < 1:
        raise ValueError(f"mesh axis sizes must be >= 1, got batch={batch}, vocab={vocab}, model={model}")
    devs = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes)
    if need > len(devs):
        raise ValueError(
            f"a mesh of batch={batch} x vocab={vocab} x model={model} = {need} devices needs {need} devices, "
            f"only {len(devs)} available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need} "
            "before importing jax)"
        )
    return Mesh(np.asarray(devs[:need], dtype=object).reshape(sizes), ("batch", "vocab", "model"))


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Which mesh axis shards what.  ``None`` turns a role off (the arrays are replicated over it).

    Validated on construction: every named axis must be an axis of ``mesh``, the roles must
    name different axes, and every mesh axis of size > 1 must have a role (an unassigned axis
    would hold identical copies on its devices, almost always a misspelt name).
    """

    mesh: Mesh
    batch_axis: str | None = "batch"
    vocab_axis: str | None = "vocab"
    model_axis: str | None = None

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise ValueError(f"ShardingConfig.mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
        names = tuple(self.mesh.axis_names)
        used = {}
        for role in AXIS_ROLES:
            ax = getattr(self, role)
            if ax is None:
                continue
            if ax not in names:
                raise ValueError(
                    f"ShardingConfig.{role}={ax!r} is not an axis of the mesh; the mesh has axes {names} "
                    f"(shape {dict(self.mesh.shape)}). Name one of them or pass {role}=None"
                )
            if ax in used:
                raise ValueError(f"mesh axis {ax!r} is given two roles: {used[ax]} and {role}")
            used[ax] = role
        for ax in names:
            if ax not in used and self.mesh.shape[ax] > 1:
                raise ValueError(
                    f"mesh axis {ax!r} (size {self.mesh.shape[ax]}) is not known to this ShardingConfig "
                    f"(batch_axis={self.batch_axis!r}, vocab_axis={self.vocab_axis!r}, "
                    f"model_axis={self.model_axis!r}); assign it a role or give it size 1"
                )

    def size(self, role: str) -> int:
        ax = getattr(self, role)
        return 1 if ax is None else int(self.mesh.shape[ax])

    @property
    def batch_size(self) -> int:
        """Devices along the batch axis (1 when unused)."""
        return self.size("batch_axis")

    @property
    def vocab_size(self) -> int:
        """Devices along the vocabulary axis (1 when unused)."""
        return self.size("vocab_axis")

    @property
    def model_size(self) -> int:
        return self.size("model_axis")

    def check_batch(self, batch: int) -> int:
        """Raise ``ValueError`` unless ``batch`` is a multiple of the batch axis size."""
        if batch % self.batch_size:
            raise ValueError(
                f"batch of {batch} rows is not divisible by the {self.batch_size} devices of mesh axis "
                f"{self.batch_axis!r}; pad the batch to a multiple of {self.batch_size} "
                f"(e.g. {-(-batch // self.batch_size) * self.batch_size} rows) or use a smaller batch axis"
            )
        return batch

    def padded_vocab(self, v: int) -> int:
        """``v`` rounded up to a multiple of the vocabulary axis size."""
        k = self.vocab_size
        return -(-int(v) // k) * k

    def sharding(self, *spec) -> NamedSharding:
        return NamedSharding(self.mesh, P(*spec))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def logits_sharding(self, ndim: int = 2) -> NamedSharding:
        """``(B, v)`` (or ``(B, n, v)`` for ``ndim=3``) sharded ``(batch, [None,] vocab)``."""
        return self.sharding(self.batch_axis, *([None] * (ndim - 2)), self.vocab_axis)


def _config(mesh_or_config: Mesh | ShardingConfig, strict: dict[str, str | None], optional: dict[str, str]) -> ShardingConfig:
    """A config for the helpers that take a bare mesh: ``strict`` roles must name mesh axes,
    ``optional`` roles are used when the mesh has an axis of that name."""
    if isinstance(mesh_or_config, ShardingConfig):
        return mesh_or_config
    if not isinstance(mesh_or_config, Mesh):
        raise ValueError(f"expected a jax.sharding.Mesh or a ShardingConfig, got {type(mesh_or_config).__name__}")
    names = tuple(mesh_or_config.axis_names)
    kw = {role: None for role in AXIS_ROLES}
    kw.update({r: a for r, a in optional.items() if a in names and a not in strict.values()})
    kw.update(strict)
    return ShardingConfig(mesh_or_config, **kw)


# ---------------------------------------------------------------- the bottleneck problem


def pad_problem(problem: BottleneckProblem, v_pad: int) -> BottleneckProblem:
    """The same problem over ``v_pad >= v`` tokens: zero rows appended to ``A`` and ``Q``.

    With ``-inf`` logits for the pad tokens (:func:`pad_logits`) every objective puts zero mass
    on them (they are masked), ``A^T p`` and ``Q^T p`` are unchanged for such ``p``, and the
    Gram matrices (hence ``T_pinv`` and the Lipschitz constants) are unchanged.
    """
    v = problem.vocab_size
    if v_pad < v:
        raise ValueError(f"v_pad={v_pad} is smaller than the problem's vocabulary v={v}")
    if v_pad == v:
        return problem
    pad = lambda M: jnp.pad(M, ((0, v_pad - v), (0, 0)))  # noqa: E731
    return problem.with_A(pad(problem.A), Q=pad(problem.Q))


def problem_shardings(problem: BottleneckProblem, config: ShardingConfig) -> BottleneckProblem:
    """A pytree like ``problem`` holding the :class:`NamedSharding` of each array (for ``jax.jit``)."""
    rows = config.sharding(config.vocab_axis, None)
    rep = config.replicated()
    return dataclasses.replace(
        problem, A=rows, Q=rows, T_pinv=rep, lipschitz_hard=rep, lipschitz_members=rep,
        A_con=None if problem.A_con is None else rows,
    )


def shard_problem(
    problem: BottleneckProblem, mesh: Mesh | ShardingConfig, vocab_axis: str = "vocab", *, pad: bool = True
) -> BottleneckProblem:
    """Place ``problem`` on ``mesh``: ``A``/``Q`` split by rows over ``vocab_axis``, the rest replicated.

    When ``v`` is not a multiple of the axis size the problem is padded (:func:`pad_problem`;
    its ``vocab_size`` grows: pad the member logits with :func:`pad_logits` /
    :func:`shard_logits`), or, with ``pad=False``, a ``ValueError`` is raised.
    """
    cfg = _config(mesh, {"vocab_axis": vocab_axis}, {"batch_axis": "batch", "model_axis": "model"})
    v = problem.vocab_size
    v_pad = cfg.padded_vocab(v)
    if v_pad != v:
        if not pad:
            raise ValueError(
                f"vocabulary size v={v} is not divisible by the {cfg.vocab_size} devices of mesh axis "
                f"{cfg.vocab_axis!r}; pass pad=True (pads to v={v_pad} with masked tokens)"
            )
        problem = pad_problem(problem, v_pad)
    return jax.device_put(problem, problem_shardings(problem, cfg))


def pad_logits(logits: Any, v_pad: int) -> Any:
    """Pad the last axis of ``logits`` (an array or a list of arrays) to ``v_pad`` with ``-inf``."""
    if isinstance(logits, (list, tuple)):
        return type(logits)(pad_logits(l, v_pad) for l in logits)
    x = jnp.asarray(logits)
    v = x.shape[-1]
    if v_pad < v:
        raise ValueError(f"v_pad={v_pad} is smaller than the logits' vocabulary {v} (shape {x.shape})")
    if v_pad == v:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, v_pad - v)], constant_values=-jnp.inf)


def shard_logits(
    logits: Any,
    mesh: Mesh | ShardingConfig,
    batch_axis: str | None = "batch",
    vocab_axis: str | None = "vocab",
    *,
    pad: bool = True,
) -> Any:
    """Place member logits on ``mesh`` sharded ``(batch, vocab)``.

    ``logits``: one ``(B, v)`` array, a list of them (one per member), or ``(B, n, v)``.
    ``B`` must be a multiple of the batch axis size (``ValueError`` otherwise); ``v`` is padded
    with ``-inf`` to a multiple of the vocabulary axis size (``pad=False``: ``ValueError``).
    """
    cfg = _config(mesh, {"batch_axis": batch_axis, "vocab_axis": vocab_axis}, {"model_axis": "model"})
    if isinstance(logits, (list, tuple)):
        return type(logits)(shard_logits(l, cfg, pad=pad) for l in logits)
    x = jnp.asarray(logits)
    if x.ndim not in (2, 3):
        raise ValueError(f"logits must be (B, v) or (B, n, v), got shape {x.shape}")
    cfg.check_batch(x.shape[0])
    v = x.shape[-1]
    v_pad = cfg.padded_vocab(v)
    if v_pad != v and not pad:
        raise ValueError(
            f"vocabulary size v={v} (logits shape {x.shape}) is not divisible by the {cfg.vocab_size} devices "
            f"of mesh axis {cfg.vocab_axis!r}; pass pad=True (pads with -inf to v={v_pad})"
        )
    return jax.device_put(pad_logits(x, v_pad), cfg.logits_sharding(x.ndim))


def _constrain(x: Array, sharding: NamedSharding) -> Array:
    return jax.lax.with_sharding_constraint(x, sharding)


def _row_spec(cfg: ShardingConfig, x: Any, v_pad: int | None) -> P:
    """Leading axis over ``batch``; a trailing axis of length ``v_pad`` over ``vocab``."""
    shape = jnp.shape(x)
    if len(shape) == 0:
        return P()
    spec = [cfg.batch_axis] + [None] * (len(shape) - 1)
    if v_pad is not None and len(shape) >= 2 and shape[-1] == v_pad and cfg.vocab_axis is not None:
        spec[-1] = cfg.vocab_axis
    return P(*spec)


def sharded_bottleneck(
    problem: BottleneckProblem, config: ShardingConfig, objective: str = "kl", **options
) -> Combiner:
    """:func:`jaxens.combiners.bottleneck.bottleneck` on a mesh.

    ``problem`` is padded (if ``v`` is not a multiple of the vocabulary axis size) and placed
    with :func:`shard_problem`; ``combine`` takes the members' *unpadded* ``(B, v)`` logits,
    pads them with ``-inf``, constrains them to ``(batch, vocab)`` and returns ``log p`` and the
    :class:`~jaxens.Solution` with ``p`` cut back to ``(B, v)``.  The warm starts in the state are
    kept sharded over ``batch`` (and ``vocab`` for length-``v`` iterates).  Use it like the
    unsharded combiner, under ``jax.jit`` or in a :class:`ShardedDecoder`; ``options`` go to
    :func:`~jaxens.combiners.bottleneck.bottleneck`.
    """
    from jaxens.combiners.bottleneck import BottleneckState, bottleneck

    v = problem.vocab_size
    v_pad = config.padded_vocab(v)
    sp = shard_problem(problem, config)
    inner = bottleneck(sp, objective, **options)
    prob_sh = problem_shardings(sp, config)

    def constrain_state(state: BottleneckState) -> BottleneckState:
        warm = jax.tree.map(lambda w: _constrain(w, NamedSharding(config.mesh, _row_spec(config, w, v_pad))), state.warm)
        valid = _constrain(state.valid, config.sharding(config.batch_axis))
        prob = jax.tree.map(_constrain, state.problem, prob_sh)
        return BottleneckState(warm, valid, prob)

    def init(batch_size: int) -> BottleneckState:
        config.check_batch(batch_size)
        state = inner.init(batch_size)
        # a fresh copy of the problem (a decode loop donates its state) with explicit shardings
        warm = jax.device_put(
            state.warm, jax.tree.map(lambda w: NamedSharding(config.mesh, _row_spec(config, w, v_pad)), state.warm)
        )
        valid = jax.device_put(state.valid, config.sharding(config.batch_axis))
        prob = jax.device_put(jax.tree.map(jnp.copy, state.problem), prob_sh)
        return BottleneckState(warm, valid, prob)

    def combine(logits, state):
        logits = list(logits)
        B = jnp.shape(logits[0])[0]
        config.check_batch(B)
        sh = config.logits_sharding()
        x = [_constrain(pad_logits(jnp.asarray(l), v_pad), sh) for l in logits]
        if state is not None:
            state = constrain_state(state)
        logp, state, sol = inner.combine(x, state)
        state = constrain_state(state)
        logp = _constrain(logp, sh)[:, :v]
        sol = sol._replace(p=_constrain(sol.p, sh)[..., :v])
        return logp, state, sol

    return Combiner(init, combine)


# ---------------------------------------------------------------- member parameters


def replicate_rule(path: tuple, x: Any) -> P:
    """Every parameter replicated on every device (pure data parallelism)."""
    return P()


def make_tensor_parallel_rule(model_axis: str, model_size: int) -> ParamRule:
    """A name-free tensor-parallel rule: shard the largest non-layer axis divisible by ``model_size``.

    Stacked-layer tensors ``(L, ...)`` keep their layer axis whole; vectors (norm scales, biases)
    stay replicated.  For the transformer members here this splits the query/key/value/MLP
    projections over their head / hidden axis (or ``d_model``) and the embedding and head over
    ``v`` or ``d_model``.  GSPMD inserts the collectives; any placement computes the same result,
    a placement only changes the communication.
    """

    def rule(path: tuple, x: Any) -> P:
        shape = jnp.shape(x)
        if len(shape) < 2 or model_size == 1:
            return P()
        first = 1 if len(shape) >= 3 else 0
        cands = [a for a in range(first, len(shape)) if shape[a] % model_size == 0 and shape[a] >= model_size]
        if not cands:
            return P()
        a = max(cands, key=lambda i: (shape[i], i))
        spec = [None] * len(shape)
        spec[a] = model_axis
        return P(*spec)

    return rule


def shard_params(state: Any, config: ShardingConfig, rule: ParamRule | None = None) -> Any:
    """Place a member's parameters (an ``nnx.State`` or any pytree) on the mesh.

    ``rule(path, array) -> PartitionSpec`` picks each array's placement; the default replicates
    everything unless the config has a ``model_axis``, in which case
    :func:`make_tensor_parallel_rule` splits the weights over it.
    """
    if rule is None:
        rule = (
            make_tensor_parallel_rule(config.model_axis, config.model_size)
            if config.model_axis is not None and config.model_size > 1
            else replicate_rule
        )
    shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(config.mesh, rule(p, x)), state)
    return jax.device_put(state, shardings)


# ---------------------------------------------------------------- decoding


class ShardedDecoder(Decoder):
    """:class:`jaxens.Decoder` on a device mesh: batch-parallel rows, replicated or sharded members.

    The decoding state is constrained inside the compiled prefill and loop: the token buffer,
    per-row counters and the diagnostics over ``batch``; each member's KV cache
    ``[L, B, S, K, H]`` over ``batch`` (and its KV heads over ``model`` when divisible); member
    logits ``(B, v)`` over ``(batch, vocab)`` (when ``v`` divides).  Member parameters are placed
    by :func:`shard_params` (``param_rule``).  The combiner is used as given: pass
    :func:`sharded_bottleneck` for a vocabulary-sharded bottleneck problem.

    The batch must be a multiple of the batch axis size (``ValueError`` otherwise).  With
    several processes (``jax.distributed.initialize``) every process calls :meth:`generate`
    with the same prompts (SPMD); the small per-row outputs are then replicated so each
    process can read every row.
    """

    def __init__(self, members, combiner, sampler=None, *, config: ShardingConfig, param_rule: ParamRule | None = None, **kwargs):
        if not isinstance(config, ShardingConfig):
            raise ValueError(f"config must be a jaxens.sharding.ShardingConfig, got {type(config).__name__}")
        self.config = config
        if isinstance(combiner, Combiner):
            combiner = self._wrap_combiner(combiner)
        super().__init__(members, combiner, sampler, **kwargs)
        self._states = tuple(shard_params(s, config, param_rule) for s in self._states)

    def _wrap_combiner(self, comb: Combiner) -> Combiner:
        cfg = self.config

        def combine(logits, state):
            v = jnp.shape(logits[0])[-1]
            if v % cfg.vocab_size == 0:
                logits = [_constrain(l, cfg.logits_sharding()) for l in logits]
            return comb.combine(logits, state)

        return Combiner(comb.init, combine)

    def _small(self, x):
        """Per-row bookkeeping: over ``batch`` on one process, replicated across processes."""
        if jax.process_count() > 1:
            return _constrain(x, self.config.replicated())
        return _constrain(x, NamedSharding(self.config.mesh, _row_spec(self.config, x, None)))

    def _constrain_cache(self, c: KVCache) -> KVCache:
        cfg = self.config

        def one(x):
            if x.ndim != 5:
                return x
            K = x.shape[3]
            heads = cfg.model_axis if (cfg.model_axis is not None and K % cfg.model_size == 0) else None
            return _constrain(x, cfg.sharding(None, cfg.batch_axis, None, heads, None))

        return KVCache(one(c.k), one(c.v))

    def _constrain_state(self, s: DecodeState) -> DecodeState:
        rep = self.config.replicated()
        B = s.tokens.shape[0]
        stats = jax.tree.map(
            lambda x: self._small(x) if (jnp.ndim(x) >= 1 and jnp.shape(x)[0] == B) else _constrain(x, rep), s.stats
        )
        return s._replace(
            key=_constrain(s.key, rep),
            tokens=self._small(s.tokens),
            pad=self._small(s.pad),
            done=self._small(s.done),
            finished=self._small(s.finished),
            num_generated=self._small(s.num_generated),
            max_new=self._small(s.max_new),
            caches=tuple(self._constrain_cache(c) if isinstance(c, KVCache) else c for c in s.caches),
            stats=stats,
        )

    def _prefill(self, *args, **kwargs):
        return self._constrain_state(super()._prefill(*args, **kwargs))

    def _step(self, models, s: DecodeState) -> DecodeState:
        return self._constrain_state(super()._step(models, self._constrain_state(s)))

    def start(self, prompts, max_new_tokens, *, key=None, seed: int = 0):
        if isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) and len(prompts) > 0:
            self.config.check_batch(len(prompts))
        return super().start(prompts, max_new_tokens, key=key, seed=seed)


# ---------------------------------------------------------------- several hosts


def process_local_logits(local: Float[Array, "b v"] | np.ndarray, config: ShardingConfig) -> Array:
    """A global ``(B, v)`` array from each process's own rows ``(B / processes, v)``.

    Every process passes the logits of its slice of the batch (its own prompts); the result is
    one global array sharded ``(batch, vocab)`` (:func:`jax.make_array_from_process_local_data`),
    ready for a jitted :func:`sharded_bottleneck` combine.  ``v`` must already be a multiple of
    the vocabulary axis size (:func:`pad_logits`).
    """
    local = np.asarray(local)
    v = local.shape[-1]
    if v % config.vocab_size:
        raise ValueError(
            f"vocabulary size v={v} is not divisible by the {config.vocab_size} devices of mesh axis "
            f"{config.vocab_axis!r}; pad it first with pad_logits(x, {config.padded_vocab(v)})"
        )
    B = local.shape[0] * jax.process_count()
    config.check_batch(B)
    return jax.make_array_from_process_local_data(config.logits_sharding(local.ndim), local, (B,) + local.shape[1:])


__all__ = [
    "ShardingConfig",
    "ShardedDecoder",
    "make_mesh",
    "make_tensor_parallel_rule",
    "pad_logits",
    "pad_problem",
    "problem_shardings",
    "process_local_logits",
    "replicate_rule",
    "shard_logits",
    "shard_params",
    "shard_problem",
    "sharded_bottleneck",
]
