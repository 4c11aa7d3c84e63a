"""The real texts jaxens trains and evaluates on, and their fixed train / validation / test split.

The texts are the ``*.txt`` files of one directory: ``$JAXENS_DATA`` when set, else
``../shared/data`` beside the repository (where CI puts the Canterbury corpus files
``alice29.txt``, ``asyoulik.txt``, ``lcet10.txt``, ``plrabn12.txt``).  Each file is read as
strict UTF-8 and split by characters, each file on its own, at line boundaries:

    text = train ‖ validation ‖ test,   |train| ≈ 0.8 n,  |validation| ≈ 0.1 n,  |test| ≈ 0.1 n

where the cut meant to fall at character ``⌊f n⌋`` (``f`` = 0.8, 0.9) moves forward to just after
the next ``\\n`` (so every part but the last ends with a newline; a file without one is cut at
``⌊f n⌋`` itself).  The split is a pure function of the file's text: the same bytes give the
same parts on every machine, the three parts are disjoint and concatenate back to the file.

API (every function takes an optional ``data_dir``; names are file names such as ``"alice29.txt"``)::

    read_text(path)                       -> one UTF-8 text file, checked
    split_part(text, "test")              -> the test part of one text
    split_tokens(paths, tokenizer, split) -> [int64[...] per file]  (one split of the given files)
    texts("test")                         -> {"alice29.txt": "...", ...}   # str per file
    tokens(tokenizer, "validation")       -> {"alice29.txt": int32[...], ...}
    token_stream(tokenizer, "train")      -> int32[N]  (the files' tokens, sorted by name, joined by EOS)
    data_root()                           -> the directory used
    data_hash()                           -> sha256 of the file names and bytes (detects changed data)

Tokenisation uses ``tokenizer.encode(text, add_special_tokens=False)`` (no BOS; :func:`encode`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.9)  # cumulative: train ends at 0.8, validation at 0.9


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The texts' directory: ``path`` if given, else ``$JAXENS_DATA``, else ``../shared/data`` beside the repo."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("JAXENS_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def _files(path: str | os.PathLike | None) -> list[Path]:
    d = data_root(path)
    if not d.is_dir():
        raise FileNotFoundError(
            f"data directory {d} not found: set JAXENS_DATA to the folder holding the *.txt texts "
            "(alice29.txt, asyoulik.txt, lcet10.txt, plrabn12.txt)"
        )
    files = sorted(p for p in d.glob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"data directory {d} holds no *.txt file: set JAXENS_DATA to the folder of the texts")
    return files


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; a missing, empty (whitespace only) or non-UTF-8 file raises ``ValueError``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"text file {p} does not exist (or is not a file)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {p} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}): "
            "re-encode it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if not text.strip():
        raise ValueError(f"text file {p} is empty")
    return text


def read_all(data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Every text of the directory, whole: ``{file name: text}`` sorted by name."""
    return {p.name: read_text(p) for p in _files(data_dir)}


def _cut(text: str, frac: float) -> int:
    i = int(frac * len(text))
    j = text.find("\n", i)
    return i if j < 0 else j + 1


def split_text(text: str) -> dict[str, str]:
    """``{"train", "validation", "test"}`` parts of one text (see the module docstring)."""
    a = _cut(text, FRACTIONS[0])
    b = max(a, _cut(text, FRACTIONS[1]))
    return {"train": text[:a], "validation": text[a:b], "test": text[b:]}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def split_part(text: str, split: str) -> str:
    """The ``split`` part of one text (:func:`split_text`)."""
    _check_split(split)
    return split_text(text)[split]


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids (``int64``) of ``text`` without special tokens (tokenizers without the keyword: plain ``encode``)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    return np.asarray(list(ids), np.int64)


def split_tokens(paths: Iterable[str | os.PathLike], tokenizer, split: str) -> list[np.ndarray]:
    """Token ids of the ``split`` part of each text file in ``paths`` (an empty part raises ``ValueError``)."""
    out = []
    for p in paths:
        ids = encode(tokenizer, split_part(read_text(p), split))
        if ids.size == 0:
            raise ValueError(f"the {split} split of {str(p)!r} is empty")
        out.append(ids)
    return out


def texts(split: str, data_dir: str | os.PathLike | None = None, names: Iterable[str] | None = None) -> dict[str, str]:
    """One split of every text (or of the files ``names``): ``{file name: text}``."""
    _check_split(split)
    allt = read_all(data_dir)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in allt]
        if missing:
            raise ValueError(f"no text named {missing} in {data_root(data_dir)}; have {sorted(allt)}")
        allt = {n: allt[n] for n in names}
    return {n: split_text(t)[split] for n, t in allt.items()}


def tokens(tokenizer, split: str, data_dir: str | os.PathLike | None = None,
           names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Token ids (``int32``, no BOS) of one split of each text: ``{file name: ids}``."""
    return {n: np.asarray(tokenizer.encode(t, add_special_tokens=False), np.int32)
            for n, t in texts(split, data_dir, names).items()}


def token_stream(tokenizer, split: str, data_dir: str | os.PathLike | None = None,
                 names: Iterable[str] | None = None) -> np.ndarray:
    """The split's tokens of every text (sorted by file name) in one ``int32`` array, each text
    followed by the tokenizer's EOS id (when it has one) so documents do not run into each other."""
    eos = getattr(tokenizer, "eos_token_id", None)
    parts = []
    for ids in tokens(tokenizer, split, data_dir, names).values():
        parts.append(ids)
        if eos is not None:
            parts.append(np.asarray([eos], np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def data_hash(data_dir: str | os.PathLike | None = None) -> str:
    """sha256 over the sorted file names and their bytes (what a trained checkpoint was trained on)."""
    h = hashlib.sha256()
    for p in _files(data_dir):
        read_text(p)  # same checks as a load
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()
