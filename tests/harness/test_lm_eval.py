"""jaxens as an lm-evaluation-harness model (jaxens/harness/lm_eval_model.py) on a local task built
from the shared texts: a multiple-choice cloze (a passage, its true next word against three other
words of the same text), a rolling log-likelihood task and a short generation task, run end to end
through lm_eval at batch 8, and the log-likelihoods checked against `jaxens eval`'s teacher-forced
scores (jaxens.harness.evaluate.collect_logits + run_combiner) on the same tokens."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local task needs no hub
lm_eval = pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'jaxens[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from toy_models import ToyConfig, ToyLM  # noqa: E402
from vocab_toys import byte_bpe, sp_bpe  # noqa: E402

from jaxens.harness import evaluate as ev  # noqa: E402
from jaxens.harness.data import data_root, read_text, split_part  # noqa: E402
from jaxens.harness.lm_eval_model import JaxensLM, rewrite_model_args  # noqa: E402
from jaxens.vocab import TokenizerView  # noqa: E402

TASKS = {
    "jaxens_cloze": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
""",
    "jaxens_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{context}}"
metric_list:
  - metric: word_perplexity
""",
    "jaxens_gen": """
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{choices[label]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def cloze_docs(n: int, seed: int = 0, context_chars: int = 60) -> list[dict]:
    """``n`` cloze items from the test split of alice29.txt: a passage prefix ending before a word,
    the true next word and three distractor words of the same text, in a seeded order."""
    text = " ".join(split_part(read_text(data_root() / "alice29.txt"), "test").split())
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", text) if m.start() > context_chars]
    vocab = sorted({m.group() for m in words})
    rng = np.random.default_rng(seed)
    docs = []
    for m in rng.choice(words, size=n, replace=False):
        ctx = text[: m.start()].rstrip()
        cut = ctx.find(" ", len(ctx) - context_chars)
        others = [w for w in rng.choice(vocab, size=8, replace=False) if w != m.group()][:3]
        choices = [" " + w for w in [m.group(), *others]]
        order = rng.permutation(4)
        docs.append({"context": ctx[cut + 1:], "choices": [choices[k] for k in order],
                     "label": int(np.argmin(order))})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "cloze.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in cloze_docs(4)))
    for name, body in TASKS.items():
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {d / 'cloze.jsonl'}\ntest_split: test\n")
        (d / f"{name}.yaml").write_text(head + body)
    return d


@pytest.fixture(scope="module")
def views():
    return TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])


@pytest.fixture(scope="module")
def members(views):
    c = ToyConfig(vocab_size=views[0].vocab_size, max_position_embeddings=256)
    return [ToyLM(c, seed=0), ToyLM(c, seed=1)]


def _run(lm, task_dir, tasks, limit=None):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, limit=limit, bootstrap_iters=0)


def _eval_scores(lm, members, pairs) -> list[float]:
    """``jaxens eval``'s teacher-forced score of each ``(context ids, continuation ids)``: one
    window over the whole sequence, every target cached, the combiner run on the rows."""
    out = []
    for ctx, cont in pairs:
        seq = np.asarray(list(ctx) + list(cont))
        T = seq.size
        data = ev.collect_logits(members, [seq], context=T - 1, stride=T - 1, positions=T, seed=0, progress=False)
        assert list(data.position) == list(range(1, T))
        rows = np.arange(len(ctx) - 1, T - 1)
        run = ev.run_combiner(lm.scorer, data.logits[:, rows], 8)
        out.append(float(run.logp[np.arange(rows.size), data.targets[rows]].sum()))
    return out


COMBINERS = [("logit_average", {}), ("prob_average", {"weight0": 0.3, "weight1": 0.7}), ("me", {}),
             ("bottleneck-kl", {"hard": "none", "soft": (0, 1), "rho": 1.0})]


@pytest.mark.parametrize("combiner,options", COMBINERS, ids=[c for c, _ in COMBINERS])
def test_cloze_end_to_end_matches_jaxens_eval(members, views, task_dir, combiner, options):
    lm = JaxensLM(members=members, tokenizers=[views[0], views[0]], combiner=combiner, batch_size=8, **options)
    res = _run(lm, task_dir, ["jaxens_cloze"])
    samples = res["samples"]["jaxens_cloze"]
    assert len(samples) == 4 and 0.0 <= res["results"]["jaxens_cloze"]["acc,none"] <= 1.0
    pairs, got = [], []
    for s in samples:
        for (ctx, cont), resp in zip([a.args if hasattr(a, "args") else a for a in s["arguments"]], s["resps"]):
            pairs.append(lm._encode_pair(ctx, cont))
            got.append(resp[0][0])
    ref = _eval_scores(lm, members, pairs)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert len(set(np.round(got, 3))) > 1  # the choices are told apart


def test_rolling_is_the_sum_over_lm_evals_windows(members, views, task_dir):
    """loglikelihood_rolling = the sum over lm_eval's disjoint rolling windows (max_length 48) of
    `jaxens eval`'s scores, one window per row (a text of > 100 tokens: several windows)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    lm = JaxensLM(members=members, tokenizers=[views[0], views[0]], combiner="prob_average", max_length=48)
    text = cloze_docs(1)[0]["context"] * 3
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = lm.tok_encode(text)
    windows = list(map(make_disjoint_window, get_rolling_token_windows(
        token_list=ids, prefix_token=lm.prefix_token_id, max_seq_len=48, context_len=1)))
    assert len(ids) > 100 and len(windows) >= 3 and sum(len(c) for _, c in windows) == len(ids)
    np.testing.assert_allclose(got, sum(_eval_scores(lm, members, windows)), atol=1e-4, rtol=0)
    res = _run(lm, task_dir, ["jaxens_rolling"], limit=2)
    assert res["results"]["jaxens_rolling"]["word_perplexity,none"] > 1


def test_generate_until_batched(members, views, task_dir):
    lm = JaxensLM(members=members, tokenizers=[views[0], views[0]], combiner="prob_average", batch_size=8)
    res = _run(lm, task_dir, ["jaxens_gen"])
    outs = [s["resps"][0][0] for s in res["samples"]["jaxens_gen"]]
    assert len(outs) == 4 and all(isinstance(o, str) and "\n" not in o for o in outs)
    # greedy: the same prompt alone in its batch gives the same text
    again = lm.generate_until([Instance("generate_until", {}, (res["samples"]["jaxens_gen"][0]["arguments"][0][0],
                                                                {"until": ["\n"], "max_gen_toks": 4}), 0)])
    assert again[0] == outs[0]


@pytest.mark.parametrize("method", ["gac", "me"])
def test_cross_tokenizer_cloze(members, views, task_dir, method):
    """Members with different tokenizers: the cloze through the cross-tokenizer decode loop; with a
    member paired with itself every method scores exactly the member."""
    mb = ToyLM(ToyConfig(vocab_size=views[1].vocab_size, max_position_embeddings=512), seed=2)
    lm = JaxensLM(members=[members[0], mb], tokenizers=list(views), combiner=method, batch_size=8)
    res = _run(lm, task_dir, ["jaxens_cloze"], limit=2)
    got = [r[0][0] for s in res["samples"]["jaxens_cloze"] for r in s["resps"]]
    assert len(got) == 8 and np.all(np.isfinite(got))
    same = JaxensLM(members=[members[0], members[0]], tokenizers=[views[0], views[0]], combiner=method)
    same.cross = True  # force the cross-tokenizer path on a same-vocabulary pair
    from jaxens.harness.bpb import pivot_method
    from jaxens.vocab.align import align

    same.method, same.alignment, same.view = pivot_method(method, None, 0, {}), align([views[0]] * 2), views[0]
    pairs = [("Alice was", " beginning"), ("", "the cat")]
    reqs = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    plain = JaxensLM(members=[members[0]], tokenizers=[views[0]], combiner="logit_average")
    # a cross-tokenizer row starts from the context token (BOS, else EOS) before the context
    toks = []
    for ctx, cont in pairs:
        c, x = plain._encode_pair(ctx, cont) if ctx else ([], plain.tok_encode(cont))
        toks.append(((ctx, cont), [plain.prefix_token_id, *c], x))
    np.testing.assert_allclose([x for x, _ in same.loglikelihood(reqs)],
                               [x for x, _ in plain._loglikelihood_tokens(toks)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["unite", "deepen", "safe"])
def test_other_cross_methods_score_and_generate(members, views, method):
    """UniTE, DeePEn and SAFE through the same paths: scores are log-probabilities (SAFE's
    sharpened top-m rows may give a piece zero mass), generation is cut at ``until``."""
    mb = ToyLM(ToyConfig(vocab_size=views[1].vocab_size, max_position_embeddings=512), seed=2)
    k_all = min(v.vocab_size for v in views)  # UniTE keeps every token: no zero mass on random members
    opts = {"deepen": {"max_anchors": 64}, "unite": {"k": k_all}}.get(method, {})
    lm = JaxensLM(members=[members[0], mb], tokenizers=list(views), combiner=method, batch_size=8, **opts)
    reqs = [Instance("loglikelihood", {}, ("the cat", " sat"), 0), Instance("loglikelihood", {}, ("", "the dog"), 1)]
    scores = lm.loglikelihood(reqs)
    assert all(x <= 0 and isinstance(g, bool) for x, g in scores)
    if method != "safe":
        assert all(np.isfinite(x) for x, _ in scores)
    out = lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["t"], "max_gen_toks": 3}), 0)])
    assert isinstance(out[0], str) and "t" not in out[0]


def test_model_args_from_the_command_line():
    argv = ["--model", "jaxens", "--model_args", "member=a,member=b,combiner=prob_average,weight=1,weight=3",
            "--tasks", "t"]
    out = rewrite_model_args(argv)
    assert out[3] == "member0=a,member1=b,combiner=prob_average,weight0=1,weight1=3" and out[4:] == ["--tasks", "t"]
    from lm_eval.api.registry import get_model

    assert get_model("jaxens") is JaxensLM
    with pytest.raises(ValueError, match="member=NAME"):
        JaxensLM(combiner="prob_average")
