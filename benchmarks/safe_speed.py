"""SAFE (block verification) vs stepwise SAFE vs ensembling every token (GaC) on SmolLM2-135M +
Gemma 3 270M: tokens per second, verifier forward calls and the fraction of positions ensembled.

    python benchmarks/safe_speed.py                                  # B = 1 and 4, 32 new tokens
    python benchmarks/safe_speed.py --batch 1 --new-tokens 16 --blocks 4

Each configuration runs once to compile and then ``--repeats`` times (median reported); greedy.
Rows: ``gac`` (every member every step), ``safe-step`` (``verify_block=1``: the drafter SmolLM2
drafts one token, Gemma is consulted on it when the position is an uncertain word boundary),
``safe-K`` (``verify_block=K``: SmolLM2 drafts ``K`` tokens, Gemma verifies them in one chunked
forward, tokens accepted up to the first ensembled position), ``drafter`` (SmolLM2 alone through
the same loop: SAFE with confidence 0, which never consults).  ``same_as_step``: the block
variant wrote exactly the stepwise variant's text (greedy).  ``tok/s`` counts generated pieces
per second over all rows (the cross-tokenizer loop's steps; compile excluded).  Writes
``results/safe_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

PROMPTS = [
    "Alice was beginning to get very tired of sitting by her sister on the bank, and",
    "The Project Gutenberg EBook of The Adventures of Sherlock Holmes. Chapter one:",
    "It was the best of times, it was the worst of times,",
    "Once upon a time, in a small village by the sea,",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--confidence", type=float, default=0.5)
    p.add_argument("--disagreement", type=float, default=0.5)
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--methods", nargs="+", default=["gac", "safe-step", "safe-block", "drafter"],
                   choices=["gac", "safe-step", "safe-block", "drafter"])
    p.add_argument("--out", default="results/safe_speed.json")
    args = p.parse_args(argv)
    from jaxens.harness import zoo
    from jaxens.sampling import Sampler
    from jaxens.vocab import SAFE, CrossDecoder, GaC, align

    m1, t1 = zoo.load("smollm2-135m", progress=False)
    m2, t2 = zoo.load("gemma3-270m", progress=False)
    al = align([t1, t2])
    kw = dict(confidence=args.confidence, disagreement=args.disagreement)
    methods = {}
    if "gac" in args.methods:
        methods["gac"] = lambda: GaC()
    if "safe-step" in args.methods:
        methods["safe-step"] = lambda: SAFE(verify_block=1, **kw)
    if "safe-block" in args.methods:
        for K in args.blocks:
            methods[f"safe-{K}"] = (lambda K=K: SAFE(verify_block=K, **kw))
    if "drafter" in args.methods:
        methods["drafter"] = lambda: SAFE(confidence=1e-9, verify_block=1)
    rows = []
    print(f"{'B':>2s} {'method':10s} {'tok/s':>7s} {'s/step':>7s} {'ens %':>6s} {'verif fwd':>9s} "
          f"{'draft fwd':>9s} {'rounds':>6s} {'same':>5s}  sample", flush=True)
    for B in args.batch:
        prompts = (PROMPTS * B)[:B]
        step_texts = None
        for name, make in methods.items():
            dec = CrossDecoder([m1, m2], [t1, t2], make(), Sampler(greedy=True), alignment=al)
            dec.generate(prompts, args.new_tokens)  # compile
            times, out = [], None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = dec.generate(prompts, args.new_tokens)
                times.append(time.perf_counter() - t0)
            st = out.stats
            dt = float(np.median(times))
            if name == "safe-step":
                step_texts = out.texts
            row = {
                "batch": B,
                "method": name,
                "tokens_per_s": st.get("positions", out.steps * B) / dt,
                "s_per_step": dt / max(out.steps, 1),
                "seconds": dt,
                "steps": out.steps,
                "positions": st.get("positions"),
                "forward_calls": st["forward_calls"],
                "ensembled_fraction": st.get("ensembled", 0) / max(st.get("positions", 1), 1),
                "consulted": st.get("consulted"),
                "rounds": st.get("rounds"),
                "drafted": st.get("drafted"),
                "same_as_step": (out.texts == step_texts) if name.startswith("safe-") and step_texts else None,
                "sample": out.texts[0],
            }
            rows.append(row)
            same = "" if row["same_as_step"] is None else str(row["same_as_step"])
            print(f"{B:2d} {name:10s} {row['tokens_per_s']:7.2f} {row['s_per_step']:7.3f} "
                  f"{100 * row['ensembled_fraction']:6.1f} {row['forward_calls'][1]:9d} {row['forward_calls'][0]:9d} "
                  f"{row['rounds'] if row['rounds'] is not None else '':>6} {same:>5s}  {out.texts[0][:60]!r}",
                  flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 CPU cores, shared)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
