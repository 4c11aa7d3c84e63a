"""DeePEn's relative transform and inverse: peak memory and time per step, dense vs chunked vs top-k.

    python benchmarks/deepen_memory.py                                   # V=16384 and 32768, A=4096, d=256
    python benchmarks/deepen_memory.py --vocab 16384 --batch 4           # one size
    python benchmarks/deepen_memory.py --gemma                           # + Gemma 3 shapes, memory only

One DeePEn step = the relative vectors of two members (main: ``V x d``; assistant: ``V/2 x d``)
and ``--steps`` AdamW steps of the inverse on the main vocabulary.  ``--gemma`` adds the real
pair's shapes (main Gemma 3: ``262144 x 640``, assistant SmolLM2: ``49152 x 576``, ``A = 8192``, the
DeePEn default cap), compiled only: its dense ``R`` (8 GiB) is not allocated and no time is
measured (the chunked form's ~30 TFLOP per step are out of reach of this CPU).  Forms:

* ``dense``: the published form, ``R = softmax(scale * cos)`` materialised (``V x A`` float32)
  and autodiff through ``softmax(z) @ R`` (:func:`jaxens.vocab.deepen.dense_inverse`);
* ``chunked``: rows of ``R`` recomputed per chunk in ``lax.scan`` (exact up to rounding);
* ``topk``: only the top-``k`` tokens' rows (``B x k x A``; error bound in the module doc).

Peak memory is XLA's compiled memory analysis of the whole step (arguments + outputs +
temporaries; the dense form's ``R`` counts, as it must exist); time is the median wall time of
``--repeats`` runs after one compile run.  Also reports max |p_form - p_dense| of the final
distribution.  Writes ``results/deepen_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxens.vocab import deepen as dp


def build(args):
    rng = np.random.default_rng(0)
    V, A, d, B = args.vocab, args.anchors, args.dim, args.batch
    V2, d2 = getattr(args, "vocab2", None) or V // 2, getattr(args, "dim2", None) or d
    if getattr(args, "compile_only", False):
        f = jnp.float32
        S = jax.ShapeDtypeStruct
        return ((S((B, V), f), S((B, V2), f)), (S((V, d), f), S((V2, d2), f)),
                (S((A,), jnp.int32), S((A,), jnp.int32)))
    E1 = jnp.asarray(rng.normal(size=(V, d)), jnp.float32)
    E2 = jnp.asarray(rng.normal(size=(V2, d2)), jnp.float32)
    a1 = jnp.asarray(rng.choice(V, A, replace=False).astype(np.int32))
    a2 = jnp.asarray(rng.choice(V2, A, replace=False).astype(np.int32))
    l1 = jax.nn.log_softmax(jnp.asarray(4 * rng.normal(size=(B, V)), jnp.float32), -1)
    l2 = jax.nn.log_softmax(jnp.asarray(4 * rng.normal(size=(B, V2)), jnp.float32), -1)
    return (l1, l2), (E1, E2), (a1, a2)


def step_fn(form, args):
    kw = dict(scale=args.scale, steps=args.steps, lr=0.15)
    w = jnp.asarray([0.5, 0.5], jnp.float32)

    if form == "dense":
        def f(lps, Es, As):
            rs = [jnp.exp(lp) @ dp.dense_relative_matrix(E, a, args.scale) for lp, E, a in zip(lps, Es, As)]
            target = w[0] * rs[0] + w[1] * rs[1]
            z = dp.dense_inverse(lps[0], target, Es[0], As[0], **kw)
            return jax.nn.softmax(z, -1)
    else:
        def f(lps, Es, As):
            lp, _ = dp.deepen_combine(list(lps), list(Es), list(As), w, mode=form, chunk=args.chunk, k=args.k, **kw)
            return jnp.exp(lp)
    return jax.jit(f)


def measure(form, args, data):
    fn = step_fn(form, args)
    compiled = fn.lower(*data).compile()
    mem = compiled.memory_analysis()
    peak = temp = None
    if mem is not None:
        peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
        temp = int(mem.temp_size_in_bytes)
    if getattr(args, "compile_only", False):
        return None, {"form": form, "peak_bytes": peak, "temp_bytes": temp, "step_s": None, "first_s": None}
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*data))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*data))
        times.append(time.perf_counter() - t0)
    return out, {"form": form, "peak_bytes": peak, "temp_bytes": temp, "step_s": float(np.median(times)), "first_s": first}


def run_config(args):
    data = build(args)
    forms = (["dense"] if not args.no_dense else []) + ["chunked", "topk"]
    rows, outs = [], {}
    for form in forms:
        outs[form], row = measure(form, args, data)
        rows.append(row)
    dense = next((r for r in rows if r["form"] == "dense"), None)
    print(f"V={args.vocab} V2={getattr(args, 'vocab2', None) or args.vocab // 2} A={args.anchors} d={args.dim} "
          f"B={args.batch} chunk={args.chunk if args.chunk else dp.default_chunk(args.anchors)} k={args.k} "
          f"steps={args.steps} compile_only={getattr(args, 'compile_only', False)} load={os.getloadavg()[0]:.1f}")
    print(f"{'form':8s} {'peak MiB':>10s} {'vs dense':>9s} {'temp MiB':>9s} {'step s':>8s} {'max|dp|':>10s}")
    for r in rows:
        f = r["form"]
        r["max_abs_diff_vs_dense"] = (float(jnp.max(jnp.abs(outs[f] - outs["dense"])))
                                      if dense and outs[f] is not None else None)
        ratio = (r["peak_bytes"] / dense["peak_bytes"]) if dense and r["peak_bytes"] and dense["peak_bytes"] else None
        r["memory_ratio"] = ratio
        nan = float("nan")
        print(f"{f:8s} {r['peak_bytes'] / 2**20 if r['peak_bytes'] else nan:10.1f} "
              f"{ratio if ratio is not None else nan:9.3f} {(r['temp_bytes'] or 0) / 2**20:9.1f} "
              f"{r['step_s'] if r['step_s'] is not None else nan:8.3f} "
              f"{r['max_abs_diff_vs_dense'] if r['max_abs_diff_vs_dense'] is not None else nan:10.2e}", flush=True)
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "sizes")}
    cfg["chunk"] = args.chunk if args.chunk else dp.default_chunk(args.anchors)
    return {"config": cfg, "rows": rows, "loadavg": os.getloadavg()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--anchors", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: deepen.default_chunk(A))")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--no-dense", action="store_true")
    p.add_argument("--gemma", action="store_true", help="also the real pair's shapes (compile only)")
    p.add_argument("--out", default="results/deepen_memory.json")
    args = p.parse_args(argv)
    runs = []
    for V in args.vocab:
        a = argparse.Namespace(**{**vars(args), "vocab": V})
        runs.append(run_config(a))
    if args.gemma:
        a = argparse.Namespace(**{**vars(args), "vocab": 262144, "dim": 640, "vocab2": 49152, "dim2": 576,
                                  "anchors": 8192, "compile_only": True})
        runs.append(run_config(a))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "loadavg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
