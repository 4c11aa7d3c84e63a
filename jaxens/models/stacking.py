"""Name and shape mapping between a transformers state dict and the families' stacked layout.

A family's parameters are a flat dict: top-level tensors (``"embed"``, ``"final_norm"``, ...) and
per-layer tensors ``"layers/<name>"`` stacked along a leading layer axis ``[L, ...]``.  A family
describes its transformers names with two tables:

* ``top``: internal name -> transformers name (``"embed" -> "model.embed_tokens.weight"``);
* ``per_layer``: short internal name -> ``(template, transpose)``, the template formatted with the
  layer index ``i`` (``"model.layers.{i}.self_attn.q_proj.weight"``); ``transpose`` marks
  ``torch.nn.Linear`` weights, stored ``[out, in]`` by transformers and ``[in, out]`` here.

:func:`gather_stacked` maps transformers -> internal (checking every shape and refusing tensors
that belong to neither table), :func:`scatter_stacked` maps back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

# transformers buffers that are not parameters (rotary tables, GPT-2's causal-mask buffers)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


class ParamLayout(Protocol):
    """What the mapping needs from a family config (the families' ``params.py`` annotate it as
    ``Any``: a Protocol with attributes cannot be checked at run time by beartype)."""

    n_layers: int

    def param_shapes(self) -> dict[str, tuple[int, ...]]: ...


def gather_stacked(
    shapes: Mapping[str, tuple[int, ...]],
    top: Mapping[str, str],
    per_layer: Mapping[str, tuple[str, bool]],
    n_layers: int,
    tensors: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Internal layout from transformers names: ``out[k] = tensors[top[k]]`` for top-level keys and
    ``out["layers/n"][i] = T(tensors[per_layer[n].format(i=i)])`` for ``i < n_layers``, with ``T`` the
    transpose where marked.  Every shape is checked against ``shapes``; a missing tensor, a shape
    mismatch or a checkpoint tensor that maps to no key raises ``ValueError``."""
    used: set[str] = set()

    def get(name: str, expected: tuple[int, ...], transpose: bool) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"missing tensor {name!r} (expected shape {expected}) in the checkpoint")
        t = np.asarray(tensors[name])
        if tuple(t.shape) != expected:
            raise ValueError(
                f"tensor {name!r}: the config expects shape {expected} but the checkpoint has {tuple(t.shape)}"
            )
        used.add(name)
        return t.T if transpose else t

    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key.startswith("layers/"):
            short = key.split("/", 1)[1]
            tmpl, tr = per_layer[short]
            hf_shape = tuple(reversed(shape[1:])) if tr else tuple(shape[1:])
            out[key] = np.stack([get(tmpl.format(i=i), hf_shape, tr) for i in range(n_layers)])
        else:
            out[key] = get(top[key], tuple(shape), False)
    unexpected = sorted(
        n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES) and n not in top.values()
    )
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} checkpoint tensors do not fit the config (wrong n_layers or family?): "
            f"{unexpected[:5]}"
        )
    return out


def scatter_stacked(
    params: Mapping[str, np.ndarray],
    top: Mapping[str, str],
    per_layer: Mapping[str, tuple[str, bool]],
    n_layers: int,
) -> dict[str, np.ndarray]:
    """The inverse of :func:`gather_stacked`: internal layout -> transformers names."""
    out = {}
    for key, v in params.items():
        if key.startswith("layers/"):
            tmpl, tr = per_layer[key.split("/", 1)[1]]
            for i in range(n_layers):
                out[tmpl.format(i=i)] = v[i].T if tr else v[i]
        else:
            out[top[key]] = v
    return out
