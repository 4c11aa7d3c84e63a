"""``jaxens train``: train a small same-vocabulary member (SmolLM2's tokenizer) from scratch
(:mod:`jaxens.harness.train`), or a zoo recipe into the cache (``--zoo``)."""

from __future__ import annotations

import argparse
import sys

from jaxens.harness import zoo
from jaxens.harness.train import RECIPES, TrainConfig, read_meta, train_to_dir


def add_train_parser(sub) -> None:
    """Register ``jaxens train`` on an argparse subparsers object."""
    t = sub.add_parser("train", help="train a small same-vocabulary (SmolLM2 tokenizer) member from scratch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--zoo", choices=sorted(RECIPES), help="train a zoo recipe into the cache (other flags ignored)")
    t.add_argument("--out", help="output checkpoint directory (Hugging Face layout)")
    t.add_argument("--d-model", type=int, default=64, help="model width")
    t.add_argument("--layers", type=int, default=2, help="transformer layers")
    t.add_argument("--head-dim", type=int, default=32, help="attention head width")
    t.add_argument("--d-ff", type=int, help="MLP width (default 4 d)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps")
    t.add_argument("--seq-len", type=int, default=128, help="training window length")
    t.add_argument("--batch-size", type=int, default=8, help="windows per step")
    t.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    t.add_argument("--warmup", type=int, help="warmup steps (default steps/10)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    t.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
    t.add_argument("--eval-every", type=int, default=100, help="steps between validation losses")
    t.add_argument("--data", help="folder of the *.txt texts (default $JAXENS_DATA or ../shared/data)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    t.set_defaults(func=cmd_train)


def cmd_train(args, out=None) -> int:
    out = out or sys.stdout
    try:
        return _cmd_train(args, out)
    except FileNotFoundError as e:  # missing data directory / texts: a usage error
        raise ValueError(str(e)) from e


def _cmd_train(args, out) -> int:
    if args.zoo:
        path = zoo.trained_dir(args.zoo, progress=not args.no_progress, data_dir=args.data)
    else:
        if not args.out:
            raise ValueError("give --out DIR (or --zoo NAME to train a zoo member into the cache)")
        cfg = TrainConfig(d_model=args.d_model, n_layers=args.layers, head_dim=min(args.head_dim, args.d_model),
                          d_ff=args.d_ff, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                          learning_rate=args.lr,
                          warmup_steps=args.warmup if args.warmup is not None else args.steps // 10,
                          weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every)
        path = train_to_dir(cfg, args.out, load_tokenizer=zoo.load_tokenizer, data_dir=args.data,
                            progress=not args.no_progress)
    meta = read_meta(path) or {}
    ppl = meta.get("test_perplexity", {})
    out.write(f"saved {path}  ({meta.get('seconds')} s; validation loss {meta.get('val_loss', float('nan')):.4f}"
              + "".join(f"; test perplexity {k} {v:.1f}" for k, v in ppl.items()) + ")\n")
    return 0
