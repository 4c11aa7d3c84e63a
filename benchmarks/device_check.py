"""Device check: jaxens decode on one accelerator against transformers, in one table, in <= 8 minutes.

    python benchmarks/device_check.py --out results/device_check.json     # a GPU machine
    python benchmarks/device_check.py --small --out /tmp/device_check.json  # toy sizes, any CPU (~1-2 min)

Made for a machine with no network where jax, flax, optax, torch and transformers are installed
and no checkpoint can be copied in: every member is built on the device with random weights
(timing does not depend on the weights), in jaxens's Flax NNX ``Llama`` and, with the same
weights, as a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` on CUDA.  Two shapes:

* ``smollm2``: SmolLM2-135M's (vocab 49152, d 576, 30 layers, 9 / 3 heads, ffn 1536, tied head);
* ``1.5b``: a Qwen2.5-1.5B-like Llama (vocab 151936, d 1536, 28 layers, 12 / 2 heads, ffn 8960,
  q/k/v bias, untied head).

Rows (``--new-tokens`` tokens per sequence after a ``--prompt-tokens`` random prompt, no stop
token; each configuration runs once to compile, then ``--repeats`` times, median reported):

* ``single``: one member in :class:`jaxens.Decoder` (greedy) vs transformers ``generate``
  (greedy, eager PyTorch, ``min_new_tokens`` = ``max_new_tokens``), batch 1 and 8, both shapes;
  the notes give the logit parity (max |Δ logit| on a 2 x 16 prompt, both at full float32
  precision) and how many greedy tokens agree before the first difference;
* ``ensemble``: ME (one member's forward per step) vs logit averaging (all members every step),
  n = 2, 3 ``smollm2``-shaped members with different random weights, plain sampling, batch 1;
* ``bottleneck``: ``bottleneck-kl`` with every member hard vs logit averaging, n = 2, batch 1;
* ``lp``: the bottleneck LP (``sum_ce``, jaxens's default ADMM, one batched call) vs HiGHS one
  row at a time (``scipy.optimize.linprog(method="highs")``) on the non-degenerate Gaussian family
  of ``benchmarks/instances.py``: ratio = HiGHS seconds per row / jaxens seconds per row, with
  the relative objective gap; skipped with a note when scipy's HiGHS is missing.

The ``/s`` columns are tokens per second (``lp``: rows per second); ratios are jaxens throughput
over the baseline's, measured in the same run.  Targets (issue 17):
single >= 1.5x PyTorch eager, ME >= 1.9x (n = 2) / 2.7x (n = 3), bottleneck >= 0.5x.  Groups
that would start after ``--budget-s`` seconds are skipped (and say so).  jaxens imports ``gguf``
(GGUF reader) and ``jaxtyping`` (annotations only) at import time; when they are not installed
they are replaced by stand-ins that are enough for this script (it reads no GGUF file and checks
no annotation), and the JSON says so.  XLA does not preallocate GPU memory here (torch shares it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch allocates on the same GPU

SHAPES = {
    "smollm2": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                    rope_theta=100000.0, rms_eps=1e-5),
    "1.5b": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, d_ff=8960,
                 rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False, model_type="qwen2"),
}
SMALL_SHAPES = {
    "smollm2": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    rope_theta=100000.0, rms_eps=1e-5),
    "1.5b": dict(vocab_size=1024, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=192,
                 rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False, model_type="qwen2"),
}
TARGETS = {"single": ">= 1.5", "me2": ">= 1.9", "me3": ">= 2.7", "bottleneck": ">= 0.5"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", "--quick", action="store_true",
                   help="toy sizes (vocab 512/1024, 2 layers), 8 new tokens, 1 repeat: a CPU smoke run")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes of the single rows")
    p.add_argument("--members", type=int, nargs="+", default=[2, 3], help="ensemble sizes of the ME rows")
    p.add_argument("--shapes", nargs="+", default=["smollm2", "1.5b"], choices=sorted(SHAPES),
                   help="member shapes of the single rows (the ensembles use smollm2)")
    p.add_argument("--groups", nargs="+", default=["single", "ensemble", "bottleneck", "lp"],
                   choices=("single", "ensemble", "bottleneck", "lp"))
    p.add_argument("--lp", type=int, nargs=4, default=[4096, 4, 32, 8], metavar=("V", "N", "D", "B"),
                   help="LP instance: vocabulary, members, member width, rows")
    p.add_argument("--lp-highs-rows", type=int, default=2, help="rows HiGHS solves (its time is per row)")
    p.add_argument("--scan-layers", action="store_true", help="jaxens members with lax.scan over layers")
    p.add_argument("--torch-tf32", action="store_true", help="let PyTorch use TF32 matmuls (default: off, as torch)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="jax's persistent compilation cache (default: the jaxens one, <cache root>/xla; '0': off), "
                        "so a second run on the same machine skips the XLA compiles")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip groups that would start after this")
    p.add_argument("--out", default="results/device_check.json")
    a = p.parse_args(argv)
    if a.small:
        a.new_tokens, a.prompt_tokens, a.repeats = min(a.new_tokens, 8), min(a.prompt_tokens, 8), 1
        a.lp, a.lp_highs_rows = [256, 2, 8, 2], 2
    return a


def stand_ins() -> list[str]:
    """Stand-ins for ``gguf`` and ``jaxtyping`` when they are missing (see the module doc)."""
    notes = []
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.modules["gguf"] = types.ModuleType("gguf")
        notes.append("gguf not installed: an empty stand-in (no GGUF file is read)")
    try:
        import jaxtyping  # noqa: F401
    except ImportError:
        import jax

        class _Dtype:
            def __getitem__(self, item):
                return jax.Array

        shim = types.ModuleType("jaxtyping")
        shim.Array, shim.ArrayLike = jax.Array, jax.typing.ArrayLike
        def dtype(name):  # Float, Int, Bool, ...: annotations only
            if name.startswith("_"):
                raise AttributeError(name)
            return _Dtype()

        shim.__getattr__ = dtype
        sys.modules["jaxtyping"] = shim
        notes.append("jaxtyping not installed: annotation-only stand-in")
    return notes


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """``(steady seconds (median), compile seconds (first run minus steady), last result)``."""
    import numpy as np

    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    steady = float(np.median(times))
    return steady, max(first - steady, 0.0), out


class Check:
    """The run: members on the device, the rows, the table and the JSON."""

    def __init__(self, a, notes):
        import jax
        import numpy as np
        import torch

        self.a, self.rows, self.t0 = a, [], time.time()
        self.shapes = SMALL_SHAPES if a.small else SHAPES
        self.rng = np.random.default_rng(0)
        self.tdev = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = a.torch_tf32
        dev = jax.devices()[0]
        self.info = dict(
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv), small=a.small,
            jax_backend=jax.default_backend(), jax_device=getattr(dev, "device_kind", str(dev)),
            torch_device=torch.cuda.get_device_name(0) if self.tdev == "cuda" else "cpu",
            jax=jax.__version__, torch=torch.__version__, platform=platform.platform(), cpu_count=os.cpu_count(),
            new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens, repeats=a.repeats, scan_layers=a.scan_layers,
            precision=("jax: default matmul precision (TF32 on NVIDIA Ampere and later); torch: allow_tf32="
                       f"{a.torch_tf32}; parity at full float32 on both"),
            notes=notes,
        )
        if jax.default_backend() == "cpu" and self.tdev == "cuda":
            self.info["notes"].append("jax runs on the CPU although a GPU is present: pip install 'jaxens[cuda]'")

    # ---------------------------------------------------------------- members
    def config(self, shape: str):
        from jaxens.models.llama import LlamaConfig

        return LlamaConfig(**self.shapes[shape], scan_layers=self.a.scan_layers)

    def member(self, shape: str, seed: int):
        from flax import nnx

        from jaxens.models.llama import Llama

        return Llama(self.config(shape), rngs=nnx.Rngs(seed))

    def torch_copy(self, member):
        """The same weights as a transformers model on the torch device."""
        import numpy as np
        import torch
        import transformers

        from jaxens.models.loading import family

        cfg = member.config.to_hf()
        kind = cfg.pop("model_type")
        cfg.pop("torch_dtype", None)
        with torch.device(self.tdev):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(kind, **cfg), dtype=torch.float32)
        state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in
                 family(kind).params_to_hf(member.config, member.params_numpy()).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = member.config.tie_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        if unexpected or (missing and not (tied and missing == ["lm_head.weight"])):
            raise RuntimeError(f"weights did not map onto transformers: missing {missing}, unexpected {unexpected}")
        return model.eval()

    def parity(self, member, model) -> float:
        import jax
        import numpy as np
        import torch

        from jaxens.models.forward import full_logits

        toks = self.rng.integers(0, member.config.vocab_size, (2, 16))
        with jax.default_matmul_precision("highest"):
            got = np.asarray(full_logits(member, toks))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.inference_mode():
            want = model(torch.tensor(toks, device=self.tdev)).logits.float().cpu().numpy()
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return float(np.max(np.abs(got - want)))

    # ---------------------------------------------------------------- rows
    def add(self, group, name, batch, n, tps, compile_s, base=None, base_tps=None, target=None, **extra):
        row = dict(group=group, name=name, batch=batch, members=n, tokens_per_s=tps, compile_s=compile_s,
                   baseline=base, baseline_tokens_per_s=base_tps, target=target, **extra)
        row["ratio"] = (tps / base_tps) if (tps and base_tps) else None
        self.rows.append(row)
        self.write(partial=True)
        r = f"  {row['ratio']:.2f}x {base} (target {target})" if row["ratio"] else ""
        print(f"[{time.time() - self.t0:6.0f}s] {group:<10} {name:<26} B={batch} n={n}: "
              f"{tps or 0:9.1f}{r}  {extra.get('notes', '')}", flush=True)

    def skip(self, group: str, why: str):
        self.rows.append(dict(group=group, name="(skipped)", notes=why))
        print(f"[{time.time() - self.t0:6.0f}s] {group}: skipped: {why}", flush=True)

    def over_budget(self, group: str) -> bool:
        if time.time() - self.t0 > self.a.budget_s:
            self.skip(group, f"over the time budget ({self.a.budget_s:.0f} s; --budget-s)")
            return True
        return False

    def decode(self, decoder, prompt, batch):
        """``run()`` generating exactly ``--new-tokens`` per row, and its tok/s."""
        n = self.a.new_tokens

        def run():
            out = decoder.generate([prompt] * batch, n, seed=0)
            assert out.lengths.tolist() == [n] * batch, out.lengths
            return out

        steady, comp, out = timed(run, self.a.repeats)
        return batch * n / steady, comp, out

    def single(self, shape: str):
        import numpy as np
        import torch

        from jaxens import Decoder, Sampler, logit_average

        a = self.a
        member = self.member(shape, seed=0)
        model = self.torch_copy(member)
        delta = self.parity(member, model)
        prompt = self.rng.integers(0, member.config.vocab_size, a.prompt_tokens).tolist()
        dec = Decoder([member], logit_average(), Sampler(greedy=True))
        for B in a.batch:
            if self.over_budget(f"single {shape} B={B}"):
                break
            tps, comp, out = self.decode(dec, prompt, B)
            inp = torch.tensor([prompt] * B, device=self.tdev)

            def run_torch():
                with torch.inference_mode():
                    res = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=a.new_tokens,
                                         min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
                if self.tdev == "cuda":
                    torch.cuda.synchronize()
                return res

            t_steady, _, res = timed(run_torch, a.repeats)
            theirs = res[0, len(prompt):].cpu().numpy()
            ours = np.asarray(out.tokens[0, : a.new_tokens])
            agree = int(np.argmin(ours == theirs)) if not np.all(ours == theirs) else a.new_tokens
            self.add("single", f"jaxens {shape}", B, 1, tps, comp, "torch generate", B * a.new_tokens / t_steady,
                     TARGETS["single"], notes=f"max|dlogit| {delta:.1e}; greedy agrees {agree}/{a.new_tokens}",
                     max_abs_logit_diff=delta, greedy_agree=agree)
        del member, model, dec
        gc.collect()
        if self.tdev == "cuda":
            torch.cuda.empty_cache()

    def ensembles(self):
        import numpy as np

        from jaxens import Decoder, Sampler, logit_average, make_combiner
        from jaxens.combiners.mixture import me

        a = self.a
        members = [self.member("smollm2", seed=10 + i) for i in range(max(a.members + [2]))]
        prompt = self.rng.integers(0, members[0].config.vocab_size, a.prompt_tokens).tolist()
        plain = Sampler()
        baselines, averaging = {}, {}

        def average(n):
            if n not in baselines:
                averaging[n] = Decoder(members[:n], logit_average(), plain)
                tps, comp, _ = self.decode(averaging[n], prompt, 1)
                baselines[n] = tps
                self.add("ensemble", "logit_average", 1, n, tps, comp)
            return baselines[n]

        if "ensemble" in a.groups:
            for n in a.members:
                if self.over_budget(f"ensemble n={n}"):
                    break
                base = average(n)
                tps, comp, out = self.decode(Decoder(members[:n], me(max_pending=8), plain), prompt, 1)
                self.add("ensemble", "me", 1, n, tps, comp, "logit_average", base, TARGETS.get(f"me{n}"),
                         notes=f"forward tokens {np.asarray(out.stats.forward_tokens).tolist()}")
        if "bottleneck" in a.groups and not self.over_budget("bottleneck"):
            base = average(2)
            t = time.perf_counter()
            comb = make_combiner("bottleneck-kl", members[:2], hard="all")
            build = time.perf_counter() - t
            tps, comp, out = self.decode(Decoder(members[:2], comb, plain), prompt, 1)
            st = out.stats
            again, _, _ = self.decode(averaging[2], prompt, 1)  # the baseline again, after the row
            self.add("bottleneck", "bottleneck-kl (hard all)", 1, 2, tps, comp, "logit_average",
                     0.5 * (base + again), TARGETS["bottleneck"],
                     notes=f"make_problem {build:.1f}s; statuses {np.asarray(st.status).sum(axis=0).tolist()}; "
                           f"max iterations {float(np.max(st.iterations)):.0f}",
                     problem_build_s=build)

    def lp(self):
        import jax
        import jax.numpy as jnp
        import numpy as np

        import jaxens

        try:
            from scipy.optimize import linprog  # noqa: F401
        except ImportError:
            return self.skip("lp", "scipy (HiGHS) not installed: no reference")
        sys.path.insert(0, str(HERE))
        from instances import gaussian, refuse_degenerate
        from references import highs_lp

        v, n, d, B = self.a.lp
        inst = gaussian(v, n, d, B, seed=0)
        refuse_degenerate(inst.delta, inst.name)
        comb = jaxens.bottleneck(jaxens.make_problem(inst.Ws, hard="all"), "sum_ce")
        logits = [jnp.asarray(inst.logits[:, i], jnp.float32) for i in range(n)]
        solve = jax.jit(comb.combine)

        def run():
            log_p, _, sol = solve(logits, comb.init(B))
            return jax.block_until_ready((log_p, sol))

        steady, comp, (log_p, sol) = timed(run, self.a.repeats)
        k = min(self.a.lp_highs_rows, B)
        A, moments = inst.A, inst.moments()
        ref = [highs_lp(A, moments[r], inst.c[r]) for r in range(k)]
        highs_s = sum(dt for _, dt, _ in ref) / k
        ours = np.exp(np.asarray(log_p, np.float64)[:k])
        gaps = [abs(inst.c[r] @ ours[r] - inst.c[r] @ p) / abs(inst.c[r] @ p) for r, (p, _, s) in enumerate(ref)
                if p is not None]
        statuses = [jaxens.Status(int(s)).name for s in np.asarray(sol.status)]
        self.add("lp", f"sum_ce ADMM ({inst.name})", B, n, 1.0 / (steady / B), comp, "HiGHS (rows/s)",
                 1.0 / highs_s, None,
                 notes=f"rel. gap vs HiGHS {max(gaps) if gaps else float('nan'):.1e} on {k} rows; "
                       f"statuses {', '.join(sorted(set(statuses)))}; degeneracy min {np.min(inst.delta):.2f}",
                 rel_gap=max(gaps) if gaps else None, statuses=statuses)

    # ---------------------------------------------------------------- output
    def write(self, partial: bool):
        out = Path(self.a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        info = dict(self.info, elapsed_s=round(time.time() - self.t0, 1), partial=partial)
        out.write_text(json.dumps({"info": info, "rows": self.rows}, indent=1, default=str))
        return out

    def table(self) -> str:
        lines = [f"device: jax {self.info['jax_device']} ({self.info['jax_backend']}), torch {self.info['torch_device']}; "
                 f"{self.info['date']}; {self.a.new_tokens} new tokens after {self.a.prompt_tokens}",
                 "| group | row | B | n | jaxens /s | baseline | baseline /s | ratio | target | compile s | notes |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        fmt = lambda x, f: "" if x is None else format(x, f)  # noqa: E731
        for r in self.rows:
            lines.append(f"| {r['group']} | {r['name']} | {fmt(r.get('batch'), 'd')} | {fmt(r.get('members'), 'd')} | "
                         f"{fmt(r.get('tokens_per_s'), '.1f')} | {r.get('baseline') or ''} | "
                         f"{fmt(r.get('baseline_tokens_per_s'), '.1f')} | {fmt(r.get('ratio'), '.2f')} | "
                         f"{r.get('target') or ''} | {fmt(r.get('compile_s'), '.1f')} | {r.get('notes', '')} |")
        return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    notes = stand_ins()
    if a.compile_cache != "0":
        from jaxens.harness.compile_cache import enable_compile_cache

        notes.append(f"compilation cache: {enable_compile_cache(a.compile_cache) or 'off'}")
    check = Check(a, notes)
    print(f"jax {check.info['jax_device']} ({check.info['jax_backend']}), torch {check.info['torch_device']}; "
          f"notes: {notes or 'none'}", flush=True)
    if "single" in a.groups:
        for shape in a.shapes:
            if not check.over_budget(f"single {shape}"):
                check.single(shape)
    if {"ensemble", "bottleneck"} & set(a.groups):
        check.ensembles()
    if "lp" in a.groups and not check.over_budget("lp"):
        check.lp()
    print("\n" + check.table())
    print(f"total {time.time() - check.t0:.0f} s; wrote {check.write(partial=False)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
