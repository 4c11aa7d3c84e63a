r"""Finished rows on disk, so that a long ``jaxens eval`` survives and resumes (:class:`RowStore`).

A store is a folder holding ``rows.jsonl`` (one finished row per line, with its per-position
:math:`\log p(x_j)` for the paired intervals), ``table.md`` (the Markdown table of the finished
rows, rewritten after each row) and ``key.json``: the hash of everything that determines the rows
(the configuration minus the choice of rows, the member names, the token arrays of both splits).  Opening a store with the
same key reuses its rows (a row is recomputed only if it is missing); any other key starts the
store afresh (the old rows are never mixed with new ones)::

    store = RowStore("runs/eval1", key)     # key = run_key(cfg, names, val_tokens, test_tokens)
    store.get("logit_average")              # the finished row, or None
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxens.harness.reports import eval_table, json_safe

NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


# settings that only choose which rows run (a row's numbers do not depend on them): adding objectives or
# constraint sets to a finished run reuses its rows
SELECTION = ("progress", "objectives", "constraints", "learn", "learn_bottleneck")


def run_key(config, names: Sequence[str], val_tokens, test_tokens) -> str:
    """sha256 of the configuration (minus the row selection :data:`SELECTION`), the member names
    and the tokens of both splits."""
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in SELECTION}
    h = hashlib.sha256(json.dumps({"config": json_safe(cfg), "members": list(names)}, sort_keys=True).encode())
    for split in (val_tokens, test_tokens):
        for t in split:
            h.update(np.ascontiguousarray(np.asarray(t, np.int64)).tobytes())
            h.update(b"|")
    return h.hexdigest()


def _restore(x):
    if isinstance(x, dict):
        return {k: _restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore(v) for v in x]
    if isinstance(x, str) and x in NONFINITE:
        return NONFINITE[x]
    return x


class RowStore:
    """Finished rows of one evaluation in ``folder`` (see the module docstring); ``folder=None``
    keeps nothing (every ``get`` misses)."""

    def __init__(self, folder, key: str):
        self.folder = None if folder is None else Path(folder)
        self.rows: dict[str, dict] = {}
        self.order: list[str] = []
        self.resumed = 0
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        keyfile, rows = self.folder / "key.json", self.folder / "rows.jsonl"
        same = keyfile.is_file() and json.loads(keyfile.read_text()).get("key") == key
        if same and rows.is_file():
            for line in rows.read_text().splitlines():
                if line.strip():
                    r = _restore(json.loads(line))
                    if "_lt" in r:
                        r["_lt"] = np.asarray(r["_lt"], np.float64)
                    self._remember(r)
            self.resumed = len(self.rows)
        else:
            rows.write_text("")
            (self.folder / "table.md").write_text("")
            keyfile.write_text(json.dumps({"key": key}) + "\n")

    def _remember(self, row: dict) -> None:
        if row["combiner"] not in self.rows:
            self.order.append(row["combiner"])
        self.rows[row["combiner"]] = row

    def get(self, name: str) -> dict | None:
        """The finished row ``name`` (a copy), or None."""
        r = self.rows.get(name)
        return None if r is None else dict(r)

    def put(self, row: dict) -> dict:
        """Record a finished row (appended to ``rows.jsonl``; ``table.md`` rewritten); returns it."""
        self._remember(row)
        if self.folder is not None:
            out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
            with (self.folder / "rows.jsonl").open("a") as f:
                f.write(json.dumps(json_safe(out)) + "\n")
            table = eval_table([{k: v for k, v in self.rows[n].items()} for n in self.order])
            (self.folder / "table.md").write_text(table + "\n")
        return row

    def cached(self, names: Sequence[str], compute) -> list[dict]:
        """The rows ``names`` from the store when all are finished, else ``compute()`` (a list of
        rows, each then recorded)."""
        got = [self.get(n) for n in names]
        if names and all(r is not None for r in got):
            return got
        return [self.put(r) for r in compute()]
