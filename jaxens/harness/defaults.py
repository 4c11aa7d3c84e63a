"""The objective's default solver with some of its fields replaced.

``default_solver(objective, **overrides)`` is
``dataclasses.replace(jaxens.combiners.bottleneck.default_solver(objective), **overrides)``
(the solver itself when there are no overrides), e.g.
``default_solver("kl", hessian_topk=2048) == EntropicNewton(hessian_topk=2048)``.
"""

from __future__ import annotations

import dataclasses

from jaxens.combiners.bottleneck import default_solver as _default_solver


def default_solver(objective: str, **overrides):
    """The default solver of ``objective`` with the dataclass fields ``overrides`` replaced."""
    solver = _default_solver(objective)
    return dataclasses.replace(solver, **overrides) if overrides else solver
