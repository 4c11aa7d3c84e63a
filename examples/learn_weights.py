"""Learn ensemble weights (and a temperature) on the validation split, then score the test split.

    python examples/learn_weights.py                          # smollm2-135m + smollm2-tiny-64
    python examples/learn_weights.py --member smollm2-135m --member smollm2-tiny-128 --bottleneck

About 2 minutes on a 2-core CPU with the checkpoints cached (about 95 CPU-seconds: the members'
forwards, then 100 Adam steps per combiner); ``--bottleneck`` adds several minutes.

Members' logits are cached once at ``--positions`` validation / test positions per text
(:func:`jaxens.harness.evaluate.collect_logits`); :func:`jaxens.learn.fit` then runs Adam on the mean
validation NLL of ``prob_average(softmax(a), exp(t))`` and ``logit_average(...)`` and, with
``--bottleneck``, of the ``kl`` bottleneck with soft constraints (weights, per-member rho,
smoothing lambda), differentiating through the entropic Newton solver's implicit adjoint.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np
import optax

from jaxens.harness import evaluate as ev
from jaxens.harness.data import data_root
from jaxens import learn
from jaxens.harness.members import load_member
from jaxens.problem import make_problem


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--member", action="append")
    ap.add_argument("--text", action="append")
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--bottleneck", action="store_true", help="also learn kl with soft constraints (slow)")
    ap.add_argument("--bottleneck-steps", type=int, default=20)
    args = ap.parse_args()
    specs = args.member or ["smollm2-135m", "smollm2-tiny-64"]
    texts = args.text or [str(data_root() / t) for t in ev.DEFAULT_TEXTS]
    loaded = [load_member(s) for s in specs]
    members, tok = [m for m, _ in loaded], loaded[0][1]
    kw = dict(context=args.context, stride=args.context // 2, positions=args.positions, seed=0)
    val = ev.collect_logits(members, ev.split_tokens(texts, tok, "validation"), split_code=1, **kw)
    test = ev.collect_logits(members, ev.split_tokens(texts, tok, "test"), split_code=2, **kw)
    print(f"{len(specs)} members, {val.logits.shape[1]} validation rows, {test.logits.shape[1]} test rows")

    def test_nll(comb, context=None):
        lp = learn.combined_log_probs(lambda p: comb, None, [jnp.asarray(x) for x in test.logits])
        return -float(np.mean(ev.row_scores(lp, test.targets).logp_target))

    for name, factory in (("prob_average", learn.prob_average_factory), ("logit_average", learn.logit_average_factory)):
        p0 = learn.averaging_params(len(members))
        t0 = time.perf_counter()
        params, hist = learn.fit(list(val.logits), val.targets, factory, p0, steps=args.steps,
                                 optimizer=optax.adam(args.lr))
        print(f"\n{name}: validation NLL {hist['loss'][0]:.4f} -> {hist['loss'].min():.4f} "
              f"({args.steps} steps, {time.perf_counter() - t0:.1f}s)")
        print(f"  learned {learn.readable(params)}")
        print(f"  test NLL uniform {test_nll(factory(p0)):.4f} -> learned {test_nll(factory(params)):.4f}")

    if args.bottleneck:
        Ws, bs = ev.unembeddings(members, ev.common_vocab(members))
        problem = make_problem(Ws, bs, hard=(), soft=tuple(range(len(members))))
        p0 = learn.bottleneck_params(len(members), rho=1.0, lam=0.1)
        t0 = time.perf_counter()
        params, hist = learn.fit(list(val.logits), val.targets, learn.bottleneck_kl_factory, p0,
                                 steps=args.bottleneck_steps, optimizer=optax.adam(args.lr), context=problem,
                                 batch_rows=8)
        print(f"\nbottleneck kl (soft): validation NLL {hist['loss'][0]:.4f} -> {hist['loss'].min():.4f} "
              f"({args.bottleneck_steps} steps, {time.perf_counter() - t0:.1f}s)")
        print(f"  learned {learn.readable(params)}")
        comb0 = learn.bottleneck_kl_factory(p0, problem)
        comb1 = learn.bottleneck_kl_factory(params, problem)
        r0 = ev.run_combiner(comb0, test.logits, 8)
        r1 = ev.run_combiner(comb1, test.logits, 8)
        n0 = -np.mean(ev.row_scores(r0.logp, test.targets).logp_target)
        n1 = -np.mean(ev.row_scores(r1.logp, test.targets).logp_target)
        print(f"  test NLL start {n0:.4f} -> learned {n1:.4f}")


if __name__ == "__main__":
    main()
