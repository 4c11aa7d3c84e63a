"""What ``jaxens generate --stats`` prints, and the notices that explain a silent wait.

* :func:`timed_decode` runs a :class:`jaxens.decode.Decoder` in phases so that the time to the
  first token (compiling the prefill and the loop, then one step) is measured apart from the
  steady decode: ``decode tok/s = (tokens after the first step) / (seconds after the first step)``.
* :func:`format_stats` names what the combiner reported: solver statuses as
  ``SOLVED=32 MAX_ITERS=0 ...`` (summed over rows and steps), maxima of float diagnostics, ME
  draws per member.
* :class:`Notice` prints one line on stderr when nothing has happened for ``after`` seconds
  (e.g. ``compiling the decode loop (first run; cached afterwards)``); :meth:`Notice.kick`
  restarts the clock (a streamed chunk), :meth:`Notice.stop` ends it.

Example::

    with Notice(sys.stderr, "compiling the decode loop (first run; cached afterwards)"):
        run = timed_decode(decoder, ids, 64, seed=0)
    print(run.timings, format_stats(run.stats))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxens.combiners.mixture import MEStats
from jaxens.solvers.solution import Status

NOTICE_AFTER_S = 3.0  # seconds of silence before a notice
COMPILE_NOTICE = "compiling the decode loop (first run; cached afterwards) ..."
STALL_NOTICE = ("still working: no new text for a few seconds (across tokenizers a new input length compiles once; "
                "later steps of that length are fast) ...")


class Notice:
    """A one-line message on ``err`` when :meth:`kick` has not been called for ``after`` seconds.

    ``message`` is printed once per wait; after :meth:`kick`, ``later`` (if given) is the message
    of the next waits, printed once at most; ``after`` defaults to :data:`NOTICE_AFTER_S`.  Use as
    a context manager or call :meth:`stop`.
    """

    def __init__(self, err, message: str | None, after: float | None = None, later: str | None = None):
        self.err, self.message, self.later = err, message, later
        self.after = NOTICE_AFTER_S if after is None else after
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self.printed = 0
        self._arm()

    def _say(self, message: str) -> None:
        with self._lock:
            self.err.write(f"[jaxens] {message}\n")
            self.err.flush()
            self.printed += 1
            if message == self.later:
                self.later = None

    def _arm(self) -> None:
        if self.message is None:
            return
        self._timer = threading.Timer(self.after, self._say, args=(self.message,))
        self._timer.daemon = True
        self._timer.start()

    def kick(self) -> None:
        """Something happened (a chunk was printed): restart the clock with the ``later`` message
        (printed at most once: a slow steady decode is not announced at every chunk)."""
        self.stop()
        self.message = self.later
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Timings(NamedTuple):
    """``first_s``: prompt to first token (compile + prefill + one step); ``decode_s``: the rest;
    ``tokens``: generated tokens (all rows); ``decode_tokens``: those after the first step."""

    first_s: float
    decode_s: float
    tokens: int
    decode_tokens: int

    @property
    def tok_per_s(self) -> float | None:
        """Steady decode speed: ``decode_tokens / decode_s`` (``None`` with no step after the first)."""
        return self.decode_tokens / self.decode_s if self.decode_tokens and self.decode_s > 0 else None

    def as_dict(self) -> dict:
        return {"compile_s": round(self.first_s, 3), "decode_s": round(self.decode_s, 3),
                "tok_per_s": None if self.tok_per_s is None else round(self.tok_per_s, 2)}

    def line(self) -> str:
        speed = "n/a" if self.tok_per_s is None else f"{self.tok_per_s:.1f} tok/s"
        return (f"first token after {self.first_s:.2f}s (compile + prefill); decode {self.decode_tokens} tokens in "
                f"{self.decode_s:.2f}s = {speed}")


class DecodeRun(NamedTuple):
    """:func:`timed_decode`'s result: per-row completions (token ids), the combiner's stats, timings."""

    completions: list[list[int]]
    finished: list[bool]
    steps: int
    stats: Any
    timings: Timings


def timed_decode(decoder, ids: list[list[int]], max_new_tokens: int, *, seed: int = 0,
                 on_chunk: Callable[[list[list[int]]], None] | None = None, chunk_steps: int = 8,
                 notice: Notice | None = None) -> DecodeRun:
    """Decode ``ids`` with ``decoder`` (``Decoder.start`` / ``run_until``): the first step apart,
    then chunks of ``chunk_steps`` steps; ``on_chunk(new_tokens_per_row)`` after each (one compile of
    the loop serves every chunk: the chunk end is an array).

    Example::

        run = timed_decode(Decoder(members, logit_average()), [[1, 2, 3]], 16)
        run.completions[0], run.timings.tok_per_s
    """
    t0 = time.perf_counter()
    state, L = decoder.start(ids, max_new_tokens, seed=seed)
    B = len(ids)
    emitted = np.zeros((B,), np.int64)
    step, first_tokens, t1 = 0, 0, None
    while True:
        step = min(step + (1 if step == 0 else chunk_steps), max_new_tokens)
        if max_new_tokens > 0:
            state = decoder.run_until(state, step)
        ngen = np.asarray(state.num_generated).astype(np.int64)
        if t1 is None:
            t1, first_tokens = time.perf_counter(), int(ngen.sum())
            if notice is not None:
                notice.kick()
        toks = np.asarray(state.tokens[:, L : L + int(state.step)])
        if on_chunk is not None:
            on_chunk([toks[b, emitted[b] : ngen[b]].tolist() for b in range(B)])
            if notice is not None:
                notice.kick()
        emitted = ngen
        if int(state.step) >= max_new_tokens or bool(np.all(np.asarray(state.done))):
            break
    t2 = time.perf_counter()
    toks = np.asarray(state.tokens[:, L : L + max_new_tokens])
    completions = [toks[b, : emitted[b]].tolist() for b in range(B)]
    total = int(emitted.sum())
    return DecodeRun(completions, np.asarray(state.finished).tolist(), int(state.step), jax.device_get(state.stats),
                     Timings(t1 - t0, t2 - t1, total, total - first_tokens))


def _json_value(x):
    x = np.asarray(x)
    if x.ndim == 0:
        v = x.item()
        return v if not isinstance(v, float) or np.isfinite(v) else str(v)
    return [_json_value(y) for y in x]


def summarize(stats: Any, row: int | None = None, batch: int | None = None) -> dict:
    """The combiner's decode statistics as JSON values: solver ``status`` counts by name, bool / int
    leaves as counts, float leaves as ``max_<name>``; for one ``row`` of ``batch`` rows, or summed
    (maxed) over every row when ``row`` is ``None``.  ME counters and the cross-tokenizer methods'
    host counters have no row axis and are returned whole."""
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return {k: v if isinstance(v, str) else _json_value(v) for k, v in stats.items()}
    if isinstance(stats, MEStats):
        return {"me_draws": _json_value(stats.draws), "me_forward_tokens": _json_value(stats.forward_tokens),
                "me_eager_catchups": _json_value(stats.eager_catchups)}
    fields = stats._asdict() if hasattr(stats, "_asdict") else {"info": stats}
    res: dict = {}
    for name, x in fields.items():
        x = np.asarray(x)
        if row is not None and x.ndim >= 1 and x.shape[0] == batch:
            x = x[row]
        if name == "status" and np.issubdtype(x.dtype, np.integer) and x.ndim >= 1:
            counts = x.reshape(-1, x.shape[-1]).sum(0)
            res["status"] = {s.name: int(counts[s.value]) for s in Status if s.value < counts.size}
        elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            res[name] = int(x.sum())
        elif np.issubdtype(x.dtype, np.floating):
            finite = x[x > -np.inf]  # -inf: no step was active
            res[f"max_{name}"] = _json_value(finite.max()) if finite.size else None
    return res


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


def format_stats(stats: Any) -> str:
    """:func:`summarize` over every row, in words: ``status SOLVED=32 MAX_ITERS=0 ..., max_iterations 7``."""
    parts = []
    for k, v in summarize(stats).items():
        if k == "status":
            parts.append("status " + " ".join(f"{n}={c}" for n, c in v.items()))
        elif k.startswith("max_"):
            parts.append(f"{k} {_fmt(v)}")
        else:
            parts.append(f"{k}={_fmt(v)}")
    return ", ".join(parts)
