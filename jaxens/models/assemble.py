"""Build a member from a checkpoint one tensor at a time, never holding two copies of its weights.

The eager path (:func:`jaxens.models.loading.model_from_hf_tensors`) holds every tensor of the
checkpoint, stacks them (``params_from_hf``) and copies them into the module, so it peaks at
about three times the weight bytes.  :func:`assemble` instead

1. builds the module abstractly (``nnx.eval_shape``: shapes and dtypes, no weights) and splits it
   into ``(graphdef, state)``;
2. checks the checkpoint's tensor names against the family's tables before reading any data
   (a missing or unexpected tensor fails at once, with the messages of
   :func:`jaxens.models.stacking.gather_stacked`);
3. reads the tensors in file order, one at a time (``LazyTensor.load``: the source reads or
   dequantises it in row chunks into one buffer), transposes ``torch.nn.Linear`` weights, casts
   to the member's dtype into a 64-byte-aligned buffer and hands it to jax with
   ``jax.device_put``, which on the CPU adopts an aligned buffer without copying it;
   scanned (stacked) layers are written into one preallocated ``[L, ...]`` buffer per weight;
4. merges ``graphdef`` with the filled state.

At any time the process holds the weights already placed plus one tensor in flight (at most two
buffers of it, the read and the cast/transposed one), so the peak is the weight bytes plus about
twice the largest tensor, far below two full copies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import jaxens.models.layers as ly
from jaxens.models.stacking import IGNORED_SUFFIXES

ALIGN = 64  # bytes; jax's CPU client adopts (does not copy) numpy buffers with this alignment


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def to_device(x: np.ndarray, dtype: Any) -> jax.Array:
    """``x`` as a jax array of ``dtype``: adopted without a copy on the CPU when ``x`` is already
    aligned, contiguous and of that dtype, else through one aligned buffer of ``dtype``."""
    dtype = np.dtype(dtype)
    if not (x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % ALIGN == 0):
        buf = aligned_empty(x.shape, dtype)
        buf[...] = x
        x = buf
    return jax.device_put(x)


class LazyTensor(Protocol):
    """One checkpoint tensor, read only when asked (a source that knows the transformers-convention
    shape from its header exposes it as ``shape``, checked before anything is read)."""

    def load(self, dtype: Any) -> np.ndarray:
        """The tensor in transformers' convention; ``dtype`` is a hint (the source may return
        float32 when it still has to transform the values)."""
        ...


def _leaf_index(state) -> dict[tuple[str, int | None], tuple[tuple, bool]]:
    """``(internal key, layer) -> (state path, stacked)`` for every leaf of an abstract member
    state: paths ``(..., key)`` for top-level tensors, ``("layers", i, name)`` for unrolled layers
    and ``("layers", name)`` for stacked (scanned) ones (layer ``None``)."""
    out = {}
    for path, _ in nnx.to_flat_state(state):
        if path[0] == "layers" and len(path) == 3 and isinstance(path[1], int):
            out[(f"layers/{path[2]}", int(path[1]))] = (path, False)
        elif path[0] == "layers" and len(path) == 2:
            out[(f"layers/{path[1]}", None)] = (path, True)
        else:
            out[(path[-1], None)] = (path, False)
    return out


def assemble(
    model_cls: type,
    config: Any,
    top: Mapping[str, str],
    per_layer: Mapping[str, tuple[str, bool]],
    tensors: Mapping[str, Any],
    *,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
    progress: bool = False,
    desc: str = "loading",
):
    """The member ``model_cls(config)`` with its weights read from ``tensors`` one at a time.

    ``top`` / ``per_layer`` are the family's transformers tables (see
    :mod:`jaxens.models.stacking`); ``tensors`` maps transformers names to lazy tensors (:class:`LazyTensor`), in the
    order to read them; ``transform(name, w)`` (optional) is applied to each loaded tensor.
    """
    shapes = config.param_shapes()
    dt = np.dtype(ly.DTYPES[config.dtype])
    # transformers name -> (internal key, layer or None, transpose, expected transformers shape)
    want: dict[str, tuple[str, int | None, bool, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith("layers/"):
            tmpl, tr = per_layer[key.split("/", 1)[1]]
            hf_shape = tuple(reversed(shape[1:])) if tr else tuple(shape[1:])
            for i in range(config.n_layers):
                want[tmpl.format(i=i)] = (key, i, tr, hf_shape)
        else:
            want[top[key]] = (key, None, False, tuple(shape))
    for name, (_, _, _, hf_shape) in want.items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name!r} (expected shape {hf_shape}) in the checkpoint")
        shape = getattr(tensors[name], "shape", None)  # known from the header (safetensors)
        if shape is not None and tuple(shape) != hf_shape:
            raise ValueError(
                f"tensor {name!r}: the config expects shape {hf_shape} but the checkpoint has {tuple(shape)}"
            )
    unexpected = sorted(
        n for n in tensors if n not in want and not n.endswith(IGNORED_SUFFIXES) and n not in top.values()
    )
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} checkpoint tensors do not fit the config (wrong n_layers or family?): "
            f"{unexpected[:5]}"
        )

    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_cls(config)))
    leaves = _leaf_index(state)
    values: dict[tuple, Any] = {}
    stacks: dict[tuple, np.ndarray] = {}
    names = [n for n in tensors if n in want]
    for name in tqdm(names, desc=desc, disable=not progress, leave=False):
        key, layer, tr, hf_shape = want[name]
        w = tensors[name].load(dt)
        if transform is not None:
            w = transform(name, w)
        if tuple(w.shape) != hf_shape:
            raise ValueError(
                f"tensor {name!r}: the config expects shape {hf_shape} but the checkpoint has {tuple(w.shape)}"
            )
        if tr:
            w = w.T
        if (key, layer) in leaves:
            path, _ = leaves[(key, layer)]
            values[path] = to_device(w, dt)
        else:  # a scanned layer stack: one preallocated [L, ...] buffer
            path, _ = leaves[(key, None)]
            if path not in stacks:
                stacks[path] = aligned_empty((config.n_layers,) + w.shape, dt)
            stacks[path][layer] = w
        del w
    for path in list(stacks):
        values[path] = jax.device_put(stacks.pop(path))
    missing = [p for p, _ in nnx.to_flat_state(state) if p not in values]
    if missing:  # every table entry was checked above; this guards the family's module layout
        raise ValueError(f"{model_cls.__name__}: no checkpoint tensor fills the weights {missing[:5]}")
    flat = [(p, v.replace(values[p])) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
