"""Decode throughput on CPU: jaxens vs transformers, averaging vs ME, bottleneck vs averaging.

    python benchmarks/decode.py            # full run (128 new tokens, batch 1 and 8)
    python benchmarks/decode.py --quick    # smoke run (8 new tokens, batch 1, no bottleneck)

Prints a table and writes ``results/decode.json``.  Rows:

* ``single``: one SmolLM2-135M member in the jaxens decode loop vs transformers (PyTorch)
  ``generate`` on the same checkpoint (the zoo's GGUF, loaded with
  ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``), greedy, batch 1 and 8;
* ``ensemble``: logit averaging of ``n`` members (all ``n`` forwards per step) vs ME (one
  forward per step), ``n = 2, 3``, plain sampling.  The members are SmolLM2-135M and copies
  with their final-norm weights perturbed by 5% (different distributions, identical cost);
* ``bottleneck``: ``bottleneck-kl`` with hard constraints on all members and
  ``bottleneck-sum_ce`` vs logit averaging, ``n = 2``, greedy; by default on two random-init
  Llamas (vocab 2048, d 128, 4 layers), ``--bottleneck-model smollm2`` for SmolLM2 copies, or
  real-sized members named on the command line, e.g.

      python benchmarks/decode.py --groups bottleneck --bottleneck-members smollm2-135m random:49152:256:4
      python benchmarks/decode.py --groups bottleneck --bottleneck-members smollm2-135m smollm2-tiny-128

  A member spec is a zoo name (``smollm2-135m``, the trained ``smollm2-tiny-64/128/256``, ...),
  a Hugging Face directory or ``.gguf`` file, ``perturbed:SEED`` (SmolLM2-135M with perturbed
  final-norm weights) or ``random:VOCAB:D:LAYERS`` (a random-init Llama; vocab 49152 shares
  SmolLM2's tokenizer).  ``--ensemble-members`` takes the same specs for the ensemble rows.

Timings exclude compilation: each configuration is run once to compile (its wall time minus
the steady-state time is reported as ``compile_s``), then ``--repeats`` times; the median is
reported.  Every row generates exactly ``--new-tokens`` tokens per sequence (no stop tokens).
A bottleneck row's ratio is against logit averaging timed just before and just after it (the
mean of the two medians; both are in the JSON as ``baseline_ms_per_step``), so a shared machine
that slows down mid-run moves the baseline with the row; ``ratio_best`` compares the fastest
repeat of each side (``best_ms_per_step``, ``baseline_best_ms_per_step``).
torch and XLA get the same number of threads (``--threads``, default all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 new tokens, batch 1, n=2 only, no bottleneck rows")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes of the single-member rows")
    p.add_argument("--ens-batch", type=int, default=1, help="batch size of the ensemble and bottleneck rows")
    p.add_argument("--members", type=int, nargs="+", default=[2, 3], help="ensemble sizes for averaging vs ME")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (tokens of alice29.txt)")
    p.add_argument("--groups", nargs="+", default=["single", "ensemble", "bottleneck"],
                   choices=("single", "ensemble", "bottleneck"), help="which rows to run")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-bottleneck", action="store_true")
    p.add_argument("--bottleneck-model", choices=("small", "smollm2"), default="small",
                   help="members of the bottleneck rows: two random-init Llamas (vocab 2048, d 128, 4 layers) "
                   "or SmolLM2-135M and a perturbed copy (make_problem on v=49152 takes many minutes on CPU)")
    p.add_argument("--bottleneck-members", nargs="+", default=None, metavar="SPEC",
                   help="member specs for the bottleneck rows (overrides --bottleneck-model): zoo names, HF dirs, "
                   ".gguf files, perturbed:SEED, random:VOCAB:D:LAYERS")
    p.add_argument("--ensemble-members", nargs="+", default=None, metavar="SPEC",
                   help="member specs for the ensemble rows (default: smollm2-135m + perturbed copies)")
    p.add_argument("--bottleneck-configs", nargs="+", default=["kl:hard=all", "sum_ce:hard=all"], metavar="SPEC",
                   help="bottleneck rows: OBJECTIVE[:hard=all|none|I,J][:soft=I,J:rho=R][:topk=K][:tol=T], e.g. "
                   "kl:hard=0:topk=1024 (EntropicNewton with the Hessian from the 1024 likeliest tokens)")
    p.add_argument("--max-pending", type=int, default=8, help="ME max_pending")
    p.add_argument("--data", default="/work/shared/data/alice29.txt")
    p.add_argument("--out", default="results/decode.json")
    a = p.parse_args(argv)
    if a.quick:
        a.new_tokens, a.batch, a.members, a.repeats, a.skip_bottleneck = 8, [1], [2], 1, True
    return a


ARGS = parse_args()
# Threads must be fixed before jax / torch start their pools.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={ARGS.threads}"
)
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxens.combiners.averaging import logit_average  # noqa: E402
from jaxens.decode import Decoder, make_combiner  # noqa: E402
from jaxens.combiners.mixture import me  # noqa: E402
from jaxens.sampling import Sampler  # noqa: E402


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def timed(fn, repeats: int, times: list | None = None) -> tuple[float, float]:
    """``(steady seconds (median of repeats), compile seconds)`` of ``fn()``; ``times``, when
    given, receives every repeat's seconds."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    out = [] if times is None else times
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    steady = float(np.median(out))
    return steady, max(first - steady, 0.0)


def jax_decode_fn(decoder, prompt, batch, n_new, seed=0):
    prompts = [prompt] * batch

    def run():
        out = decoder.generate(prompts, n_new, seed=seed)
        assert out.lengths.tolist() == [n_new] * batch, out.lengths
        return out

    return run


def perturbed_copy(member, seed: int, scale: float = 0.05):
    from jaxens.models.llama import Llama

    params = member.params_numpy()
    rng = np.random.default_rng(seed)
    params["final_norm"] = params["final_norm"] * (1.0 + scale * rng.standard_normal(params["final_norm"].shape))
    return Llama(member.config, {k: jnp.asarray(v, jnp.float32) for k, v in params.items()})


def member_from_spec(spec: str, base):
    """A member from a command-line spec (see the module doc); ``base`` is SmolLM2-135M."""
    from flax import nnx

    from jaxens.harness import zoo
    from jaxens.models.llama import Llama, LlamaConfig

    if spec.startswith("perturbed:"):
        return perturbed_copy(base, seed=int(spec.split(":")[1])), spec
    if spec.startswith("random:"):
        vocab, d, layers = (int(x) for x in spec.split(":")[1:4])
        heads = max(1, d // 64)
        cfg = LlamaConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                          d_ff=3 * d, head_dim=d // heads)
        return Llama(cfg, rngs=nnx.Rngs(layers)), f"random-init {cfg}"
    if spec in ("smollm2-135m", "smollm2"):
        return base, "SmolLM2-135M-Instruct"
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        from jaxens.models.gguf import load_gguf

        return load_gguf(path), spec
    if path.is_dir():
        from jaxens.models.loading import load_hf_dir

        return load_hf_dir(path), spec
    return zoo.load_model(spec, progress=False), f"zoo {spec}"


def bottleneck_spec(spec: str, n: int) -> tuple[str, dict]:
    """``OBJECTIVE[:key=value...]`` -> (combiner name, make_combiner options)."""
    from jaxens.solvers.defaults import default_solver

    objective, *kvs = spec.split(":")
    opts, solver_kw = {}, {}
    for kv in kvs:
        key, _, val = kv.partition("=")
        if key == "hard":
            opts["hard"] = val if val in ("all", "none") else tuple(int(i) for i in val.split(","))
        elif key == "soft":
            opts["soft"] = tuple(int(i) for i in val.split(","))
        elif key == "rho":
            opts["rho"] = float(val)
        elif key == "topk":
            solver_kw["hessian_topk"] = int(val)
        elif key == "tol":
            solver_kw["tol"] = float(val)
        else:
            raise SystemExit(f"unknown key {key!r} in bottleneck spec {spec!r}")
    if solver_kw:
        opts["solver"] = default_solver(objective, **solver_kw)
    return f"bottleneck-{objective}", opts


def main():
    from jaxens.harness import zoo

    a = ARGS
    rows = []
    info = {
        "threads": a.threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "new_tokens": a.new_tokens,
        "repeats": a.repeats,
        "loadavg_start": loadavg(),
        "quick": a.quick,
        "members_note": "SmolLM2-135M-Instruct (zoo GGUF Q4_1 dequantised to float32) and copies with the "
        "final-norm weights perturbed by 5% (same cost, different distributions)",
    }
    print(f"threads={a.threads} load={info['loadavg_start']}", flush=True)
    member, tok = zoo.load("smollm2-135m", progress=False)
    text = Path(a.data).read_text(errors="replace")
    ids = tok.encode(text[:4000])[: a.prompt_tokens]
    info["prompt_tokens"] = len(ids)
    info["prompt_text"] = tok.decode(ids)

    def _write(partial: bool):
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"info": {**info, "partial": partial}, "rows": rows}, indent=2))
        return out

    def add(group, name, batch, n_members, steady, compile_s, baseline=None, target=None, extra=None):
        tps = batch * a.new_tokens / steady
        row = dict(group=group, name=name, batch=batch, members=n_members, time_s=round(steady, 4),
                   tokens_per_s=round(tps, 2), ms_per_step=round(1000 * steady / a.new_tokens, 2),
                   compile_s=round(compile_s, 2), loadavg=loadavg())
        if baseline is not None:
            row["baseline"] = baseline["name"]
            row["ratio"] = round(tps / baseline["tokens_per_s"], 3)
            row["target"] = target
        if extra:
            row.update(extra)
        rows.append(row)
        _write(partial=True)  # a long run stopped by hand keeps the rows it measured
        r = f" ratio {row['ratio']:.2f}x vs {baseline['name']} (target {target})" if baseline else ""
        print(f"  {group:<10} {name:<28} B={batch} n={n_members}: {tps:8.1f} tok/s "
              f"({row['ms_per_step']:.1f} ms/step, compile {compile_s:.1f}s){r}", flush=True)
        return row

    # ---- single member: jaxens vs transformers generate
    greedy = Sampler(greedy=True)
    single = Decoder([member], logit_average(), greedy)
    torch_model = None
    if not a.skip_torch and "single" in a.groups:
        import torch
        import transformers

        torch.set_num_threads(a.threads)
        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        path = zoo.fetch("smollm2-135m", progress=False)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    for B in a.batch if "single" in a.groups else ():
        steady, comp = timed(jax_decode_fn(single, ids, B, a.new_tokens), a.repeats)
        jrow = add("single", "jaxens", B, 1, steady, comp)
        if torch_model is not None:
            import torch

            inp = torch.tensor([ids] * B)

            def run_torch():
                with torch.no_grad():
                    out = torch_model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=a.new_tokens,
                                               min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
                assert out.shape == (B, len(ids) + a.new_tokens), out.shape
                return out

            steady, comp = timed(run_torch, a.repeats)
            trow = add("single", "torch generate", B, 1, steady, comp)
            jrow.update(baseline=trow["name"], ratio=round(jrow["tokens_per_s"] / trow["tokens_per_s"], 3),
                        target=">= 1.5")
            print(f"  -> jaxens / torch at B={B}: {jrow['ratio']:.2f}x (target >= 1.5)", flush=True)

    # ---- ensembles: logit averaging vs ME
    members = [member]
    if a.ensemble_members:
        members, notes = zip(*(member_from_spec(s, member) for s in a.ensemble_members))
        members = list(members)
        info["members_note"] = "; ".join(notes)
    plain = Sampler()
    B = a.ens_batch
    avg_rows = {}
    for n in sorted(a.members) if "ensemble" in a.groups else ():
        while len(members) < n:
            members.append(perturbed_copy(member, seed=len(members)))
        ms = members[:n]
        vocab = min(m.config.vocab_size for m in ms)
        avg = Decoder(ms, logit_average(), plain, vocab_size=vocab)
        steady, comp = timed(jax_decode_fn(avg, ids, B, a.new_tokens), a.repeats)
        arow = add("ensemble", "logit_average", B, n, steady, comp)
        avg_rows[n] = arow
        mix = Decoder(ms, me(max_pending=a.max_pending), plain, vocab_size=vocab)
        out_holder = {}

        def run_me(mix=mix):
            out_holder["out"] = jax_decode_fn(mix, ids, B, a.new_tokens)()

        steady, comp = timed(run_me, a.repeats)
        st = out_holder["out"].stats
        add("ensemble", "me", B, n, steady, comp, arow, ">= 1.9" if n == 2 else ">= 2.7" if n == 3 else None,
            extra=dict(me_forward_tokens=np.asarray(st.forward_tokens).tolist(),
                       me_eager_catchups=np.asarray(st.eager_catchups).tolist()))

    # ---- bottleneck vs logit averaging (n = 2, greedy)
    if not a.skip_bottleneck and "bottleneck" in a.groups:
        if a.bottleneck_members:
            ms, notes = zip(*(member_from_spec(s, member) for s in a.bottleneck_members))
            ms = list(ms)
            info["bottleneck_members"] = "; ".join(notes)
            vocab = min(m.config.vocab_size for m in ms)
            bids = [t % vocab for t in ids]
        elif a.bottleneck_model == "smollm2":
            while len(members) < 2:
                members.append(perturbed_copy(member, seed=len(members)))
            ms = members[:2]
            bids = ids
        else:
            from flax import nnx

            from jaxens.models.llama import Llama, LlamaConfig

            cfg = LlamaConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384)
            ms = [Llama(cfg, rngs=nnx.Rngs(i)) for i in range(2)]
            info["bottleneck_members"] = f"2 random-init Llamas {cfg}"
            bids = [t % cfg.vocab_size for t in ids]
        bvocab = min(m.config.vocab_size for m in ms)
        avg = Decoder(ms, logit_average(), greedy, vocab_size=bvocab)
        steady, comp = timed(jax_decode_fn(avg, bids, B, a.new_tokens), a.repeats)
        base = add("bottleneck", "logit_average (greedy)", B, 2, steady, comp)
        for spec in a.bottleneck_configs:
            name, opts = bottleneck_spec(spec, len(ms))
            t = time.perf_counter()
            comb = make_combiner(name, ms, vocab_size=bvocab, **opts)
            build = time.perf_counter() - t
            dec = Decoder(ms, comb, greedy, vocab_size=bvocab)
            holder = {}

            def run_b(dec=dec):
                holder["out"] = jax_decode_fn(dec, bids, B, a.new_tokens)()

            base_times, row_times = [], []
            before, _ = timed(jax_decode_fn(avg, bids, B, a.new_tokens), a.repeats, base_times)
            steady, comp = timed(run_b, a.repeats, row_times)
            after, _ = timed(jax_decode_fn(avg, bids, B, a.new_tokens), a.repeats, base_times)
            # the ratio against the baseline timed just before and just after this row (a noisy
            # machine moves both together; the baseline row above is only the first timing);
            # also best-of-repeats on both sides (the least disturbed runs)
            adjacent = 0.5 * (before + after)
            near = dict(name="logit_average (greedy, timed before and after this row)",
                        tokens_per_s=B * a.new_tokens / adjacent)
            st = holder["out"].stats
            ms_step = lambda t: round(1000 * t / a.new_tokens, 2)  # noqa: E731
            add("bottleneck", spec, B, len(ms), steady, comp, near, ">= 0.5",
                extra=dict(baseline_ms_per_step=[ms_step(t) for t in (before, after)],
                           best_ms_per_step=ms_step(min(row_times)),
                           baseline_best_ms_per_step=ms_step(min(base_times)),
                           ratio_best=round(min(base_times) / min(row_times), 3),
                           problem_build_s=round(build, 2),
                           status_histogram=np.asarray(st.status).sum(axis=0).tolist(),
                           max_iterations=float(np.max(st.iterations)),
                           max_primal_residual=float(np.max(st.primal_residual))))

    info["loadavg_end"] = loadavg()
    print("\n| group | name | B | n | tok/s | ms/step | compile s | ratio | best-of ratio | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['name']} | {r['batch']} | {r['members']} | {r['tokens_per_s']:.1f} | "
              f"{r['ms_per_step']:.1f} | {r['compile_s']:.1f} | {r.get('ratio', '')} | {r.get('ratio_best', '')} | "
              f"{r.get('target', '') or ''} |")
    print(f"load average start {info['loadavg_start']} end {info['loadavg_end']}; threads {a.threads}")
    print(f"wrote {_write(partial=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
