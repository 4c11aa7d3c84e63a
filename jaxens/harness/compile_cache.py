"""Compile once: jax's persistent compilation cache under the jaxens cache directory.

``jaxens`` commands call :func:`enable_compile_cache` before anything is compiled, so a second
run of the same command loads its executables from disk instead of compiling them again (the
decode loop, every member's prefill and chunk forwards).  Library users call it themselves::

    from jaxens.harness.compile_cache import enable_compile_cache
    enable_compile_cache()            # <cache root>/xla, or $JAXENS_COMPILE_CACHE
    enable_compile_cache("/tmp/xla")  # an explicit directory

Where the cache lives (:func:`compile_cache_dir`): an explicit ``path``, else
``$JAXENS_COMPILE_CACHE``, else ``xla/`` inside the zoo's cache root
(:func:`jaxens.harness.zoo.cache_root`: ``$JAXENS_CACHE`` or ``~/.cache/jaxens``).
``JAXENS_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``) and the CLI's ``--no-compile-cache``
turn it off.

A hit needs the same lowered program, compile options, jax/jaxlib version and device kind; the
key ignores source locations.  jaxens's compiled functions take the member weights as
arguments (``nnx.split`` state, never closed-over constants) and their names and static
options do not change between runs, so the same command hits.  Tracing and lowering still run
in every process (the trace counts of :class:`jaxens.decode.Decoder` are unchanged); only the
XLA compile is skipped.

The cache directory is trusted code: do not point it at a folder others can write to.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxens.harness.zoo import cache_root

ENV = "JAXENS_COMPILE_CACHE"
OFF_WORDS = ("0", "off", "false", "no")


def compile_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The persistent cache directory: ``path``, else ``$JAXENS_COMPILE_CACHE``, else
    ``<cache root>/xla``; ``None`` when ``$JAXENS_COMPILE_CACHE`` is one of ``0 off false no``.

    Example::

        compile_cache_dir()          # PosixPath('/home/me/.cache/jaxens/xla')
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV, "").strip()
    if env.lower() in OFF_WORDS:
        return None
    if env:
        return Path(env).expanduser()
    return cache_root() / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None, *, min_compile_secs: float = 0.0) -> Path | None:
    """Turn on jax's persistent compilation cache at :func:`compile_cache_dir` ``(path)``.

    Every executable whose compile took at least ``min_compile_secs`` is written, whatever its
    size (``jax_persistent_cache_min_entry_size_bytes = -1``).  Call it before the first
    compile of the process: jax opens the cache once.  Returns the directory, or ``None`` when
    ``$JAXENS_COMPILE_CACHE`` turns the cache off (nothing is changed then).  A directory that
    cannot be created is a ``ValueError`` naming it and the fix.

    Example::

        enable_compile_cache()                 # ~/.cache/jaxens/xla
        Decoder(members, logit_average()).generate(prompts, 32)   # compiled once, on disk
    """
    where = compile_cache_dir(path)
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"the compilation cache {where} cannot be created: {e.strerror or e}; set {ENV} to a writable "
            f"directory, or {ENV}=0 (or --no-compile-cache) to compile without it"
        ) from None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return where
