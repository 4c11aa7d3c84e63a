"""Ensemble two members with different tokenizers: SmolLM2-135M (byte-level BPE, 49k vocab) and
Gemma 3 270M (SentencePiece, 262k vocab), with every cross-tokenizer method in jaxens.vocab.

    python examples/cross_tokenizer.py                   # all methods, 24 new tokens, greedy
    python examples/cross_tokenizer.py gac deepen --new-tokens 16

About 3 minutes on a 2-core CPU with the checkpoints cached (about 125 CPU-seconds, 7 GB of
memory: Gemma's 262k-wide logits).

Also prints the alignment (anchors, union size) and the bits per byte of a held-out passage of
alice29.txt for each member and for their word-level mixture.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxens.harness import zoo
from jaxens.sampling import Sampler
from jaxens.harness.bpb import word_mixture_bits_per_byte
from jaxens.vocab import SAFE, CrossDecoder, DeePEn, GaC, MECross, UniTE, align

PROMPTS = ["Alice was beginning to get very tired of sitting by her sister on the bank, and",
           "The capital of France is"]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alice29.txt"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("methods", nargs="*", default=["gac", "unite", "deepen", "safe", "me"])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--bpb-chars", type=int, default=2000)
    args = p.parse_args()
    smol, smol_tok = zoo.load("smollm2-135m")
    gemma, gemma_tok = zoo.load("gemma3-270m")
    al = align([smol_tok, gemma_tok])
    print(f"anchors {al.num_anchors}, union vocabulary {al.union_size}")
    methods = {"gac": GaC(), "unite": UniTE(k=10), "deepen": DeePEn(mode="topk", k=128, max_anchors=4096),
               "safe": SAFE(confidence=0.5, disagreement=0.5), "me": MECross()}
    for name in args.methods:
        sampler = Sampler(temperature=0.7) if name == "me" else Sampler(greedy=True)  # ME: exact only untruncated
        dec = CrossDecoder([smol, gemma], [smol_tok, gemma_tok], methods[name], sampler, alignment=al)
        t0 = time.perf_counter()
        out = dec.generate(PROMPTS, args.new_tokens, seed=0)
        print(f"--- {name} ({time.perf_counter() - t0:.1f}s incl. compile) stats {out.stats}")
        for prompt, text in zip(PROMPTS, out.texts):
            print(f"{prompt}|{text}")
    if DATA.is_file() and args.bpb_chars > 0:
        text = DATA.read_text(encoding="latin-1")[10000:10000 + args.bpb_chars]
        dec = None  # free the last decoder's caches before scoring (Gemma's 262k-wide logits are large)
        ens, (a, b) = word_mixture_bits_per_byte([smol, gemma], [smol_tok, gemma_tok], text, chunk=128)
        print(f"bits per byte: smollm2 {a.bpb:.3f}  gemma3 {b.bpb:.3f}  word-level mixture {ens.bpb:.3f}")


if __name__ == "__main__":
    main()
