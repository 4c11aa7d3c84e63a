"""The text and JSONL output of ``jaxens generate``.

Text output echoes each prompt above its completion::

    ### prompt 0
    Once upon a time
    ### completion 0
     there was a little girl ...

(a single prompt is streamed under ``### prompt`` / ``### completion``).  ``--jsonl OUT`` writes
one JSON object per prompt (``OUT`` ``-``: stdout, and no text output)::

    {"prompt": "Once upon a time", "completion": " there was ...", "tokens": [1034, ...],
     "finished": true, "combiner": "logit_average",
     "timings": {"compile_s": 21.3, "decode_s": 4.1, "tok_per_s": 15.6, "batch": 4},
     "stats": {"status": {"SOLVED": 64, "MAX_ITERS": 0, ...}, "max_iterations": 7.0}}

``timings`` are those of the prompt's batch (``compile_s``: prompt to first token, compile and
prefill included; ``tok_per_s``: the steady decode of the whole batch); ``stats`` are the row's
combiner diagnostics (:func:`jaxens.cli.stats.summarize`; batch-wide for ME and the cross-tokenizer methods).
"""

from __future__ import annotations

import json
import os
import sys



class TextStream:
    """Incremental detokenisation: print the new suffix of ``decode(all tokens)``."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, ids):
        self.ids += list(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text

    def finish(self):
        """Print what is left (also when a decode rewrote already printed text)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        common = len(os.path.commonprefix([text, self.printed]))
        self.out.write(text[common:])
        self.printed = text


def header(kind: str, i: int | None) -> str:
    """``### prompt 3`` / ``### completion`` (``i=None``: a single prompt)."""
    return f"### {kind}" + ("" if i is None else f" {i}") + "\n"


def echo(out, prompt: str, completion: str, i: int | None) -> None:
    """One prompt and its completion, under their headers."""
    out.write(header("prompt", i) + prompt + "\n" + header("completion", i) + completion + "\n")


def record(prompt: str, completion: str, tokens, finished: bool, combiner: str, timings: dict, stats: dict) -> dict:
    """One JSONL object (see the module doc)."""
    return {"prompt": prompt, "completion": completion, "tokens": [int(t) for t in tokens],
            "finished": bool(finished), "combiner": combiner, "timings": timings, "stats": stats}


class JsonlWriter:
    """Appends records to ``path`` (``-``: stdout), one JSON object per line, flushed per record."""

    def __init__(self, path: str | None, stdout=None):
        self.path = path
        self._stdout = stdout or sys.stdout
        self._f = None
        if path is not None:
            self._f = self._stdout if path == "-" else open(path, "w", encoding="utf-8")  # noqa: SIM115

    @property
    def to_stdout(self) -> bool:
        return self.path == "-"

    def write(self, rec: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None and self._f is not self._stdout:
            self._f.close()
        self._f = None
