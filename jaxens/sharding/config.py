r"""Device meshes and :class:`ShardingConfig`: which mesh axis shards what.

Three mesh axes, each optional: ``batch`` (rows of every ``(B, ...)`` array), ``vocab`` (the
``v`` axis of the bottleneck problem's ``v x D`` matrices and of every ``(B, v)`` vector) and
``model`` (member parameters, tensor parallel).  See :mod:`jaxens.sharding` for the whole picture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array

AXIS_ROLES = ("batch_axis", "vocab_axis", "model_axis")


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

    An array of shape ``(B, v)`` under :meth:`logits_sharding` holds on each device a block of
    ``B / batch_size`` rows and ``v / vocab_size`` tokens.

    Example (8 devices)::

        cfg = ShardingConfig(make_mesh(batch=2, vocab=4))
        cfg.batch_size, cfg.vocab_size        # (2, 4)
        cfg.padded_vocab(250)                 # 252: v rounded up to a multiple of 4
        x = jax.device_put(logits, cfg.logits_sharding())   # (B, v) over (batch, vocab)
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


def config_for(mesh_or_config: Mesh | ShardingConfig, strict: dict[str, str | None], optional: dict[str, str]) -> ShardingConfig:
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


def constrain(x: Array, sharding: NamedSharding) -> Array:
    """``lax.with_sharding_constraint``: ``x`` placed as ``sharding`` (values unchanged)."""
    return jax.lax.with_sharding_constraint(x, sharding)


def row_spec(cfg: ShardingConfig, x: Any, v_pad: int | None) -> P:
    """Leading axis over ``batch``; a trailing axis of length ``v_pad`` over ``vocab``."""
    shape = jnp.shape(x)
    if len(shape) == 0:
        return P()
    spec = [cfg.batch_axis] + [None] * (len(shape) - 1)
    if v_pad is not None and len(shape) >= 2 and shape[-1] == v_pad and cfg.vocab_axis is not None:
        spec[-1] = cfg.vocab_axis
    return P(*spec)
