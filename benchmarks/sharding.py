"""Vocabulary-sharded bottleneck solving: per-device memory and time per step vs device count.

For each mesh (``batch x vocab`` devices) the bottleneck combiner (:func:`jaxens.sharding.sharded_bottleneck`)
solves one decoding step for ``B`` rows: ``v`` tokens, ``n`` members of width ``d`` (``A`` is
``v x n(d+1)``, with biases).  Member 0 is the hard member (``hard=(0,)``: always feasible, so
every row runs the objective's solver, not the infeasibility path); all members' moments are
still computed from the full ``A``.  Reported per mesh and objective:

* ``A``/``Q`` bytes held per device (from ``array.addressable_shards``; the largest device) and
  their total: the ``v x D`` matrices are split ``v / vocab`` rows per device;
* XLA's per-device argument / temporary sizes of the compiled step (``memory_analysis``) when
  the backend reports them;
* wall time per step (median of ``--repeats`` calls after a warm-up) and per solver iteration;
* ``max |p - p_1dev|`` against the one-device result.

    python benchmarks/sharding.py                       # v=16384, 4 members x 64, B=8, 1..8 devices
    python benchmarks/sharding.py --v 32768 --d 128 --batch 16 --objectives kl least_squares sum_ce

On CPU the devices are *virtual* (``--xla_force_host_platform_device_count``, set here when
absent): they share the host's cores and memory, so the times say nothing about scaling on
accelerators (on a 2-core machine more devices are mostly overhead).  The memory column is the
real per-device footprint the same program has on GPUs/TPUs.  Writes ``results/sharding.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# several virtual CPU devices sharing XLA's multithreaded Eigen pool can deadlock inside the
# batched LAPACK custom calls (every pool thread waiting on its own sub-tasks); run each
# device single-threaded
if "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxens  # noqa: E402
from jaxens.sharding import ShardingConfig, make_mesh, sharded_bottleneck  # noqa: E402


def make_instance(v: int, n: int, d: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(v, d)) / np.sqrt(d) for _ in range(n)]
    bs = [0.5 * rng.normal(size=v) for _ in range(n)]
    logits = [jnp.asarray(np.stack([W @ (3.0 * rng.normal(size=d)) + b for _ in range(batch)]), jnp.float32) for W, b in zip(Ws, bs)]
    return jaxens.make_problem(Ws, bs, hard=(0,)), logits


def _per_device_bytes(x) -> dict:
    out: dict = {}
    for s in x.addressable_shards:
        out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
    return out


def _memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def run_one(problem, logits, objective, batch_axis: int, vocab_axis: int, repeats: int):
    cfg = ShardingConfig(make_mesh(batch_axis, vocab_axis))
    comb = sharded_bottleneck(problem, cfg, objective, check_feasibility=False, warm_start=False)
    state = comb.init(logits[0].shape[0])
    step = jax.jit(comb.combine)
    t0 = time.perf_counter()
    compiled = step.lower(logits, state).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(logits, state)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(logits, state))
        times.append(time.perf_counter() - t0)
    sol = out[2]
    A, Q = state.problem.A, state.problem.Q
    pa, pq = _per_device_bytes(A), _per_device_bytes(Q)
    return dict(
        devices=batch_axis * vocab_axis,
        mesh=dict(batch=batch_axis, vocab=vocab_axis),
        objective=objective,
        A_shape=list(A.shape),
        Q_shape=list(Q.shape),
        A_Q_bytes_per_device=max(pa[k] + pq.get(k, 0) for k in pa),
        A_Q_bytes_total=int(A.nbytes + Q.nbytes),
        xla_memory_per_device=_memory_analysis(compiled),
        compile_s=compile_s,
        step_ms=1e3 * float(np.median(times)),
        iterations_mean=float(np.mean(np.asarray(sol.iterations))),
        statuses=np.bincount(np.asarray(sol.status), minlength=5).tolist(),
        p=np.asarray(sol.p),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v", type=int, default=16384)
    ap.add_argument("--n", type=int, default=4, help="members")
    ap.add_argument("--d", type=int, default=64, help="hidden size of each member")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--objectives", nargs="+", default=["kl", "least_squares"])
    ap.add_argument("--meshes", nargs="+", default=["1x1", "1x2", "1x4", "4x1", "8x1"],
                    help="batch x vocab device grids")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", "sharding.json"))
    args = ap.parse_args(argv)

    problem, logits = make_instance(args.v, args.n, args.d, args.batch)
    rows = []
    print(f"v={args.v}  members={args.n} x d={args.d} (+bias): A is {tuple(problem.A.shape)}, Q is {tuple(problem.Q.shape)}, "
          f"batch {args.batch}; backend {jax.default_backend()}, {jax.device_count()} devices")
    print("CPU devices are virtual (one host's cores): times are indicative only; memory per device is exact.")
    hdr = f"{'objective':<14}{'mesh':>6}{'A+Q MiB/dev':>13}{'temp MiB/dev':>13}{'step ms':>10}{'iters':>7}{'ms/iter':>9}{'max|dp|':>10}"
    print(hdr)
    for objective in args.objectives:
        ref = None
        for m in args.meshes:
            b, k = (int(x) for x in m.split("x"))
            r = run_one(problem, logits, objective, b, k, args.repeats)
            p = r.pop("p")
            ref = p if ref is None else ref
            r["max_abs_dp_vs_first_mesh"] = float(np.max(np.abs(p - ref)))
            r["ms_per_iteration"] = r["step_ms"] / max(r["iterations_mean"], 1.0)
            rows.append(r)
            tmp = (r["xla_memory_per_device"] or {}).get("temp_size_in_bytes")
            print(f"{objective:<14}{m:>6}{r['A_Q_bytes_per_device'] / 2**20:>13.2f}"
                  f"{(tmp / 2**20 if tmp is not None else float('nan')):>13.2f}{r['step_ms']:>10.1f}"
                  f"{r['iterations_mean']:>7.1f}{r['ms_per_iteration']:>9.2f}{r['max_abs_dp_vs_first_mesh']:>10.1e}", flush=True)
    meta = dict(
        note="CPU devices are virtual (--xla_force_host_platform_device_count) and share the host's cores: "
        "times are indicative only; A/Q bytes per device are the real per-device footprint.",
        v=args.v, n=args.n, d=args.d, batch=args.batch, backend=jax.default_backend(),
        jax=jax.__version__, machine=platform.machine(), cpus=os.cpu_count(),
        load=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    sys.exit(main())
