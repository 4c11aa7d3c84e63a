"""SAFE vs ensembling every token (GaC) on SmolLM2-135M + Gemma 3 270M: time per step and the
fraction of positions ensembled.

    OPENBLAS_NUM_THREADS=1 python benchmarks/safe_speed.py                 # B=2, 24 new tokens
    python benchmarks/safe_speed.py --new-tokens 16 --confidence 0.5 --disagreement 0.4

Each method runs once to compile and then ``--repeats`` times (median reported); greedy.  Rows:
``gac`` (every member every step), ``safe`` (drafter = SmolLM2; Gemma consulted only at
uncertain word boundaries), ``drafter`` (SmolLM2 alone through the same loop: GaC with weights
(1, 0) still runs both members, so the drafter row is SAFE with confidence 0, which never
consults).  Writes ``results/safe_speed.json``.
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
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--confidence", type=float, default=0.5)
    p.add_argument("--disagreement", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=["gac", "safe", "drafter"], choices=["gac", "safe", "drafter"])
    p.add_argument("--out", default="results/safe_speed.json")
    args = p.parse_args(argv)
    from jaxens.models import zoo
    from jaxens.sampling import Sampler
    from jaxens.vocab import SAFE, CrossDecoder, GaC, align

    m1, t1 = zoo.load("smollm2-135m", progress=False)
    m2, t2 = zoo.load("gemma3-270m", progress=False)
    al = align([t1, t2])
    prompts = (PROMPTS * args.batch)[: args.batch]
    methods = {
        "gac": GaC(),
        "safe": SAFE(confidence=args.confidence, disagreement=args.disagreement),
        "drafter": SAFE(confidence=1e-9),
    }
    rows = []
    for name, meth in methods.items():
        if name not in args.methods:
            continue
        dec = CrossDecoder([m1, m2], [t1, t2], meth, Sampler(greedy=True), alignment=al)
        dec.generate(prompts, args.new_tokens)  # compile
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = dec.generate(prompts, args.new_tokens)
            times.append(time.perf_counter() - t0)
        st = out.stats
        row = {
            "method": name,
            "s_per_step": float(np.median(times)) / max(out.steps, 1),
            "steps": out.steps,
            "forward_calls": st["forward_calls"],
            "ensembled_fraction": st.get("ensembled", 0) / max(st.get("positions", 1), 1),
            "sample": out.texts[0],
        }
        rows.append(row)
        print(f"{name:8s} {row['s_per_step']:.3f} s/step  forward calls {row['forward_calls']}  "
              f"ensembled {row['ensembled_fraction']:.1%}  | {out.texts[0]!r}", flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows, "loadavg": load}, indent=2))


if __name__ == "__main__":
    main()
