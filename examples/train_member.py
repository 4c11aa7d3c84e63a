"""Train a small same-vocabulary member (SmolLM2's tokenizer, v = 49,152) from scratch and use it.

    python examples/train_member.py --d-model 64 --layers 2 --steps 200 --out /tmp/tiny64

About 3 minutes on a 2-core CPU (about 150 CPU-seconds for the default 200 steps; ``--generate``
adds loading SmolLM2 and a short decode).

Trains on the train split of the real texts ($JAXENS_DATA or ../shared/data), prints the held-out
perplexity on the test split of alice29.txt, saves a Hugging Face directory and generates a few
tokens with it together with the zoo's SmolLM2-135M (logit average; same tokenizer).
The fixed zoo recipes are one call away: ``jaxens.harness.zoo.load("smollm2-tiny-64")``.
"""

from __future__ import annotations

import argparse

import numpy as np

from jaxens.harness import data
from jaxens.harness import zoo
from jaxens.models.loading import load_hf_dir
from jaxens.harness.train import TrainConfig, read_meta, train_to_dir, window_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", default="/tmp/jaxens-tiny-member")
    ap.add_argument("--generate", action="store_true", help="also decode with SmolLM2-135M + the new member")
    args = ap.parse_args()

    cfg = TrainConfig(d_model=args.d_model, n_layers=args.layers, steps=args.steps, learning_rate=args.lr,
                      warmup_steps=args.steps // 10)
    path = train_to_dir(cfg, args.out, load_tokenizer=zoo.load_tokenizer)
    meta = read_meta(path)
    print(f"saved {path}: {meta['seconds']} s, validation loss {meta['val_loss']:.3f}")

    # the same held-out number, recomputed from the saved checkpoint
    member = load_hf_dir(path)
    tok = zoo.load_tokenizer("smollm2-135m")
    ids = data.tokens(tok, "test", names=["alice29.txt"])["alice29.txt"]
    print(f"test perplexity on alice29.txt (windows of {cfg.seq_len}): "
          f"{window_perplexity(member, ids, cfg.seq_len):.1f}")

    if args.generate:
        from jaxens.decode import Decoder, make_combiner
        from jaxens.sampling import Sampler

        big = zoo.load_model("smollm2-135m")
        members = [big, member]
        dec = Decoder(members, make_combiner("logit_average", members, weights=[0.8, 0.2]),
                      Sampler(greedy=True), stop_tokens=[tok.eos_token_id], pad_id=tok.eos_token_id)
        prompt = tok.encode("Alice was beginning to get very tired")
        out = dec.generate([prompt], 24, seed=0)
        print(tok.decode(np.asarray(out.tokens[0][: out.lengths[0]]).tolist()))


if __name__ == "__main__":
    main()
