"""Report writers of both evaluations: the result container, Markdown tables, JSON and PNG plots.

* :class:`EvalResult`: rows (one dict per table line), the configuration and the measurement
  context; written as JSON by :func:`write_json` (non-finite floats as ``"inf"``/``"-inf"``/``"nan"``).
* :func:`eval_table`: the token-level table of :mod:`jaxens.harness.evaluate` (NLL, PPL, top-1,
  ECE, solver columns); :func:`bpb_table`: the bits-per-byte table of
  :mod:`jaxens.harness.eval_cross`.
* the PNG plots are :mod:`jaxens.harness.plots` (``plot_eval``, ``plot_bpb``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


@dataclasses.dataclass
class EvalResult:
    """Rows of the table (dicts), the configuration and the measurement context."""

    rows: list[dict]
    config: dict
    meta: dict

    def to_json(self) -> dict:
        return {"config": self.config, "meta": self.meta, "rows": self.rows}

    def markdown(self) -> str:
        return eval_table(self.rows)


def progress_bar(**kw):
    """A tqdm bar on stderr."""
    return tqdm(file=sys.stderr, **kw)


# ---------------------------------------------------------------- Markdown


def fmt(x, spec: str) -> str:
    """``format(x, spec)``; ``"-"`` for None/NaN, ``"inf"`` for infinities."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def markdown(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _dnll(r: dict) -> str:
    """``Δ [ci_low, ci_high]`` (the paired bootstrap interval), else ``Δ ± s.e.``."""
    d, se = r.get("delta", r.get("dnll")), r.get("dnll_se")
    if d is None:
        return "-"
    if isinstance(d, float) and math.isinf(d):
        return "inf"
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is not None and hi is not None:
        return f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    return f"{d:+.4f} ± {se:.4f}" if se is not None and se == se else f"{d:+.4f}"


def eval_table(rows: Sequence[dict]) -> str:
    """The evaluation table in Markdown (one line per combiner)."""
    head = ("combiner", "NLL", "ΔNLL vs tuned [95% CI]", "PPL", "inf rows", "NLL finite", "top-1", "ECE", "infeasible",
            "not conv.", "iters", "lambda", "tok/s")
    lines = []
    for r in rows:
        if "nll" not in r:
            lines.append([r["combiner"]] + ["-"] * (len(head) - 1))
            continue
        lines.append([
            r["combiner"],
            fmt(r["nll"], ".4f"),
            _dnll(r),
            fmt(r["ppl"], ".2f"),
            f"{r['inf_rows']}/{r['rows']}",
            fmt(r["nll_finite"], ".4f"),
            fmt(r["top1"], ".3f"),
            fmt(r["ece"], ".3f"),
            fmt(r.get("infeasible"), ".2f"),
            fmt(r.get("not_converged"), ".2f"),
            fmt(r.get("iters"), ".1f"),
            fmt(r.get("lam"), ".3g"),
            fmt(r.get("tok_s"), ".1f"),
        ])
    return markdown(head, lines)


def bpb_table(rows: Sequence[dict], texts: Sequence[str] = ()) -> str:
    """The bits-per-byte table in Markdown (one line per member / method)."""
    head = ["combiner", "bpb", "zero-prob", "bpb smoothed (λ)"] + [f"bpb {t}" for t in texts] + \
        ["bytes", "tokens", "tok/s"]
    lines = []
    for r in rows:
        sm = "-" if r.get("bpb_smoothed") is None else f"{fmt(r['bpb_smoothed'], '.4f')} ({r['lam']:g})"
        cells = [r["combiner"], fmt(r["bpb"], ".4f"), str(r.get("zero", 0)), sm]
        cells += [fmt(r.get("per_text", {}).get(t), ".4f") for t in texts]
        cells += [str(r["bytes"]), "-" if r.get("tokens") is None else str(r["tokens"]), fmt(r.get("tok_s"), ".1f")]
        lines.append(cells)
    return markdown(head, lines)


# ---------------------------------------------------------------- JSON


def json_safe(x):
    """``x`` with numpy scalars as Python numbers and non-finite floats as strings (nested)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    return x


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(json_safe(result.to_json()), indent=2) + "\n")
