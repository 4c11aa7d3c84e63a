"""How does the ensemble's probability of the observed token respond to each member's logits?

    python examples/sensitivity.py --member smollm2-135m --member smollm2-tiny-64 [--plot sens.png]

About a minute on a 2-core CPU with the checkpoints cached (about 30 CPU-seconds; the first run
downloads SmolLM2 and trains smollm2-tiny-64, about 3 CPU-minutes).

At one held-out position (``--position`` in the test split of ``--text``) this prints
``d log p[y] / d l_i`` (:func:`jaxens.learn.sensitivity`) for probability averaging, logit
averaging and the ``kl`` bottleneck with soft constraints and smoothing (gradient through the
solver's implicit adjoint): per member, the L1 norm and the tokens with the largest effect.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from jaxens.harness import evaluate as ev
from jaxens.harness.data import data_root
from jaxens import learn
from jaxens.harness.members import load_member
from jaxens.combiners.averaging import logit_average, prob_average
from jaxens.combiners.bottleneck import bottleneck
from jaxens.problem import make_problem


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--member", action="append")
    ap.add_argument("--text", default=None)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--position", type=int, default=100, help="target index in the test split")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--plot", help="PNG: |gradient| over the tokens ranked by the combined distribution")
    args = ap.parse_args()
    specs = args.member or ["smollm2-135m", "smollm2-tiny-64"]
    text = args.text or str(data_root() / "alice29.txt")
    loaded = [load_member(s) for s in specs]
    members, tok = [m for m, _ in loaded], loaded[0][1]
    ids = ev.split_tokens([text], tok, "test")[0]
    j = min(max(args.position, args.context), ids.size - 1)
    from jaxens.models.forward import full_logits

    v = ev.common_vocab(members)
    window = jnp.asarray(ids[j - args.context : j][None], jnp.int32)
    x = [np.asarray(full_logits(m, window))[0, -1, :v] for m in members]
    y = int(ids[j])
    print(f"context: ...{tok.decode(ids[j - 12:j].tolist())!r} -> observed {tok.decode([y])!r}\n")
    Ws, bs = ev.unembeddings(members, v)
    problem = make_problem(Ws, bs, hard=(), soft=tuple(range(len(members))))
    decode = lambda k: tok.decode([k])  # noqa: E731
    combs = {
        "prob_average": prob_average(),
        "logit_average": logit_average(),
        "bottleneck kl soft rho=1 lam=0.1": bottleneck(problem, "kl", rho=1.0, lam=0.1),
    }
    grads = {}
    for name, comb in combs.items():
        val, g = learn.sensitivity(x, y, comb)
        grads[name] = np.asarray(g)
        print(f"{name}: log p[y] = {val:.4f}")
        print(learn.sensitivity_report(g, specs, top=args.top, decode=decode) + "\n")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        fig, axes = plt.subplots(len(grads), 1, figsize=(8, 2.2 * len(grads)), sharex=True)
        for ax, (name, g) in zip(np.atleast_1d(axes), grads.items()):
            order = np.argsort(-np.abs(g).sum(0))[:40]
            for i, s in enumerate(specs):
                ax.bar(np.arange(40) + 0.4 * i, g[i, order], width=0.4, label=s)
            ax.set_title(name, fontsize=9)
            ax.set_xticks(np.arange(40), [decode(int(k)) for k in order], rotation=90, fontsize=6)
        np.atleast_1d(axes)[0].legend(fontsize=7)
        fig.supylabel("d log p[y] / d logit")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
