"""Compile once: a ``jaxens`` command run twice in fresh processes over one persistent cache.

    python benchmarks/compile_once.py                      # the README's main command (gac, 48 tokens)
    python benchmarks/compile_once.py --cache /tmp/xla -- generate --member smollm2-135m --prompt Hi

Each run is a new Python process calling :func:`jaxens.cli.main` with ``JAXENS_COMPILE_CACHE``
pointing at one folder (emptied first unless ``--keep``).  Per run it reports the wall time, the
time to the first streamed token (process start to the first write to stdout), and jax's own
compile-time events: tracing, lowering to MLIR, and the XLA backend compile (which on a cache hit
is the time to load the executable), plus the persistent cache's hits and misses.  The second
run should compile in about the time it takes to read its executables back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = [
    "generate", "--member", "smollm2-135m", "--member", "gemma3-270m", "--combiner", "gac", "--prompt",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do:",
    "--max-new-tokens", "48", "--greedy", "--stats",
]
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}


def child(argv: list[str], report: str, t_start: float) -> int:
    """Run ``jaxens argv`` in this process and write the timings to ``report`` (JSON)."""
    import jax

    from jaxens.cli import main

    stats = {name: 0.0 for name in EVENTS.values()} | {"hits": 0, "misses": 0, "first_token_s": None,
                                                       "compiles": []}
    stats |= {f"{name[:-2]}_cpu_s": 0.0 for name in EVENTS.values()}
    started = {}

    def on_start(event, value, **_):  # jax records each compile phase's start as a scalar
        if event in EVENTS:
            started[event] = time.process_time()

    def on_duration(event, duration, **kw):
        if event in EVENTS:
            stats[EVENTS[event]] += duration
            stats[f"{EVENTS[event][:-2]}_cpu_s"] += time.process_time() - started.pop(event, time.process_time())
        if EVENTS.get(event) == "compile_s":
            stats["compiles"].append((kw.get("fun_name", "?"), round(duration, 3)))

    def on_event(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            stats["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            stats["misses"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_scalar_listener(on_start)
    out = sys.stdout

    class FirstWrite:
        def write(self, s):
            if s and stats["first_token_s"] is None:
                stats["first_token_s"] = time.time() - t_start
            return out.write(s)

        def flush(self):
            out.flush()

    sys.stdout = FirstWrite()
    try:
        code = main(argv)
    finally:
        sys.stdout = out
    stats["wall_s"] = time.time() - t_start
    stats["cpu_s"] = time.process_time()
    Path(report).write_text(json.dumps(stats))
    return code


def run_twice(argv: list[str], cache: Path, keep: bool = False) -> list[dict]:
    """Two fresh processes of ``jaxens argv`` over the cache folder ``cache``; their reports."""
    if cache.exists() and not keep:
        shutil.rmtree(cache)
    env = dict(os.environ, JAXENS_COMPILE_CACHE=str(cache), PYTHONPATH=str(ROOT))
    runs = []
    for i in range(2):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            report = f.name
        code = (f"import sys, time; t = time.time(); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import compile_once; sys.exit(compile_once.child({argv!r}, {report!r}, t))")
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"run {i + 1} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        stats = json.loads(Path(report).read_text()) | {"process_s": time.time() - t0, "stderr": proc.stderr}
        stats["entries"] = sum(1 for _ in cache.rglob("*") if _.is_file())
        runs.append(stats)
        os.unlink(report)
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="cache folder (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="do not empty --cache first")
    ap.add_argument("--verbose", action="store_true", help="also list each run's slowest compiles")
    ap.add_argument("--out", type=Path, help="write both runs' figures as JSON")
    ap.add_argument("command", nargs="*", help="jaxens arguments after '--' (default: the README's main command)")
    args = ap.parse_args(argv)
    command = args.command or README_COMMAND
    tmp = None if args.cache else tempfile.mkdtemp(prefix="jaxens-xla-")
    try:
        runs = run_twice(command, args.cache or Path(tmp), keep=args.keep)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"jaxens {' '.join(command[:9])}{' ...' if len(command) > 9 else ''}")
    print("seconds: wall (CPU time of the process)")
    print(f"{'run':>4} {'total':>13} {'first token':>12} {'trace':>13} {'lower':>13} {'XLA compile':>13} "
          f"{'hits':>5} {'misses':>7} {'entries':>8}")
    for i, r in enumerate(runs, 1):
        ft = "-" if r["first_token_s"] is None else f"{r['first_token_s']:.1f}"
        cell = {k: f"{r[k + '_s']:.2f} ({r[k + '_cpu_s']:.2f})" for k in ("trace", "lower", "compile")}
        print(f"{i:>4} {r['wall_s']:>6.1f} ({r['cpu_s']:>4.1f}) {ft:>12} {cell['trace']:>13} {cell['lower']:>13} "
              f"{cell['compile']:>13} {r['hits']:>5} {r['misses']:>7} {r['entries']:>8}")
    if args.verbose:
        for i, r in enumerate(runs, 1):
            top = sorted(r["compiles"], key=lambda c: -c[1])[:8]
            print(f"  run {i} slowest compiles:", ", ".join(f"{n} {t:.2f}s" for n, t in top))
    for r in runs:
        tail = [line for line in r["stderr"].splitlines() if line.strip()]
        if tail:
            print("  stderr:", tail[-1][:200])
    if args.out:
        args.out.write_text(json.dumps([{k: v for k, v in r.items() if k != "stderr"} for r in runs], indent=1))


if __name__ == "__main__":
    main()
