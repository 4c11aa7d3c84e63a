"""Ensemble decoding on a device mesh: batch-parallel rows, vocabulary-sharded bottleneck solve.

On a CPU the devices are virtual (``--xla_force_host_platform_device_count``, set here from the
mesh size before jax is imported); on one host with several GPUs/TPUs it runs as is, and on
several hosts with ``--coordinator/--num-processes/--process-id`` (see docs/sharding.md)::

    python examples/sharded_decode.py                                  # 2 rows on batch 2 x vocab 2
    python examples/sharded_decode.py --batch-axis 8 --vocab-axis 1 --prompts 8   # data parallelism
    python examples/sharded_decode.py --batch-axis 2 --vocab-axis 1 --model-axis 4 --combiner logit_average
    python examples/sharded_decode.py --check                          # also decode on 1 device, compare

    # two hosts (run on each, same arguments except --process-id):
    python examples/sharded_decode.py --coordinator host0:1234 --num-processes 2 --process-id 0 --local-solve kl

The default mesh (batch 2 x vocab 2, four virtual CPU devices, one row per device) is one that
works on a CPU: several rows per virtual CPU device can deadlock jaxlib's batched LAPACK calls in
the Newton solver (docs/sharding.md, "CPU caveat"; 8 rows on a batch 2 x vocab 4 mesh hangs), so
on a CPU keep ``--prompts`` at most ``--batch-axis``.  It takes about a minute on a 2-core CPU
(about 35 CPU-seconds, mostly compiling; ``--check`` adds a one-device decode).

The members are two small random-weight Llama-style models (nothing to download); swap in real
members from :mod:`jaxens.models` (``jaxens.harness.zoo``) the same way.  The bottleneck makes the
first member hard (``hard=(0,)``: always feasible) and prints the solver statuses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-axis", type=int, default=2, help="devices along the batch (data) axis")
    ap.add_argument("--vocab-axis", type=int, default=2, help="devices along the vocabulary axis")
    ap.add_argument("--model-axis", type=int, default=1, help="devices along the member tensor-parallel axis")
    ap.add_argument("--combiner", default="bottleneck-kl", help="logit_average or bottleneck-<objective>")
    ap.add_argument("--prompts", type=int, default=2, help="rows (a multiple of --batch-axis; on CPU at most it)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1000, help="vocabulary size (need not divide the vocab axis)")
    ap.add_argument("--check", action="store_true", help="also decode on one device and compare the tokens")
    ap.add_argument("--local-solve", default=None, metavar="OBJECTIVE",
                    help="several processes: also solve process-local logit rows with this bottleneck objective")
    ap.add_argument("--coordinator", default=None, help="host:port of process 0 (several hosts)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    return ap.parse_args(argv)


def fake_cpu_devices(n: int) -> None:
    """On CPU, ``n`` virtual devices (the flag must be set before jax is imported)."""
    if os.environ.get("JAX_PLATFORMS", "").startswith(("cuda", "gpu", "tpu")) or "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={n}"
    if "xla_cpu_multi_thread_eigen" not in flags:  # virtual devices share XLA's Eigen pool
        flags += " --xla_cpu_multi_thread_eigen=false"
    os.environ["XLA_FLAGS"] = flags.strip()


def main(argv=None):
    args = parse_args(argv)
    fake_cpu_devices(args.batch_axis * args.vocab_axis * args.model_axis)
    import jax
    import numpy as np

    if args.coordinator is not None:
        # every process runs this same script; afterwards jax.devices() lists all hosts' devices
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    import jaxens
    from jaxens.models.llama import Llama, LlamaConfig, init_params
    from jaxens.sampling import Sampler
    from jaxens.sharding import ShardedDecoder, ShardingConfig, make_mesh, sharded_bottleneck

    cfg_m = LlamaConfig(vocab_size=args.vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=256)
    # random weights (std 0.3: varied, not near-uniform, next-token distributions)
    members = [Llama(cfg_m, init_params(cfg_m, jax.random.key(seed), std=0.3)) for seed in (0, 1)]
    # every process builds the same prompts (decoding is SPMD: each process passes the global batch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, args.vocab, size=rng.integers(2, 12)).tolist() for _ in range(args.prompts)]

    mesh = make_mesh(args.batch_axis, args.vocab_axis, args.model_axis)
    config = ShardingConfig(mesh, model_axis="model")
    if args.combiner == "logit_average":
        combiner = jaxens.logit_average()
    elif args.combiner.startswith("bottleneck-"):
        Ws, bs = zip(*(m.unembedding() for m in members))
        problem = jaxens.make_problem(Ws, bs, hard=(0,))
        combiner = sharded_bottleneck(problem, config, args.combiner.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown --combiner {args.combiner!r}")
    dec = ShardedDecoder(members, combiner, Sampler(greedy=True), config=config, cache_len=64)

    t0 = time.perf_counter()
    out = dec.generate(prompts, args.new_tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = dec.generate(prompts, args.new_tokens)
    again = time.perf_counter() - t0
    if jax.process_index() == 0:
        print(f"{jax.process_count()} process(es), {jax.device_count()} devices ({jax.default_backend()}); "
              f"mesh {dict(mesh.shape)}; combiner {args.combiner}")
        print(f"first call (compile + run) {first:.1f} s, second call {again:.2f} s for {len(prompts)} rows x {args.new_tokens} tokens")
        if getattr(out.stats, "status", None) is not None:
            counts = np.asarray(out.stats.status).sum(0)
            print("solver statuses over rows and steps: " + " ".join(
                f"{s.name}={int(counts[s.value])}" for s in jaxens.Status))
        for b in range(min(3, len(prompts))):
            print(f"  row {b}: {prompts[b]} -> {out.tokens[b, : out.lengths[b]].tolist()}")
        if args.check:
            if args.combiner == "logit_average":
                ref_comb = jaxens.logit_average()
            else:
                ref_comb = jaxens.bottleneck(problem, args.combiner.split("-", 1)[1])
            ref = jaxens.Decoder(members, ref_comb, Sampler(greedy=True), cache_len=64).generate(prompts, args.new_tokens)
            same = bool(np.array_equal(ref.tokens, out.tokens))
            print(f"tokens identical to the single-device decoder: {same}")
            if not same:
                raise SystemExit(1)

    if args.local_solve is not None:
        # process-local data: each process holds the member logits of ITS rows only
        from jax.experimental import multihost_utils

        from jaxens.sharding import pad_logits, process_local_logits

        objective = args.local_solve
        Ws, bs = zip(*(m.unembedding() for m in members))
        problem = jaxens.make_problem(Ws, bs, hard=(0,))
        combiner = sharded_bottleneck(problem, config, objective)
        b_local = len(prompts) // jax.process_count()
        rows = slice(jax.process_index() * b_local, (jax.process_index() + 1) * b_local)
        all_logits = [np.asarray(jax.random.normal(jax.random.key(7 + i), (len(prompts), args.vocab))) * 3 for i in range(2)]
        v_pad = config.padded_vocab(args.vocab)
        x = [process_local_logits(np.asarray(pad_logits(l[rows], v_pad)), config) for l in all_logits]
        # the padded problem the combiner holds takes padded logits directly (it pads again only if needed)
        _, _, sol = jax.jit(combiner.combine)(x, combiner.init(len(prompts)))
        p = multihost_utils.process_allgather(sol.p, tiled=True)  # every row, on every process
        if jax.process_index() == 0:
            ref_comb = jaxens.bottleneck(problem, objective)
            _, _, ref = jax.jit(ref_comb.combine)([np.asarray(l) for l in all_logits], ref_comb.init(len(prompts)))
            err = float(np.max(np.abs(np.asarray(p)[:, : args.vocab] - np.asarray(ref.p))))
            print(f"process-local rows solved on the global mesh: max |p - p_1dev| = {err:.1e}")
            if err > 1e-5:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
