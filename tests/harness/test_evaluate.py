"""The teacher-forced evaluation harness (jaxens.harness.evaluate, `jaxens eval`) on tiny random members."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.harness import evaluate as ev
from jaxens.cli import main
from jaxens.combiners.bottleneck import bottleneck
from jaxens.models.forward import token_nll
from jaxens.problem import make_problem
from toy_models import ToyConfig, ToyLM

# the toy splits have far fewer validation rows than a reliable choice needs (tested in test_evaluate_store.py)
pytestmark = pytest.mark.filterwarnings("ignore::jaxens.harness.evaluate.run.FewValidationRowsWarning")

V = 64
CFG = dict(context=16, stride=8, positions=10, val_positions=8, batch_rows=8, learn_steps=15, progress=False)


@pytest.fixture(scope="module")
def members():
    c = ToyConfig(vocab_size=V, max_position_embeddings=64)
    return [ToyLM(c, seed=0), ToyLM(c, seed=1)]


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(123)
    val = [rng.integers(0, V, 40), rng.integers(0, V, 33)]
    test = [rng.integers(0, V, 50), rng.integers(0, V, 45)]
    return val, test


@pytest.fixture(scope="module")
def result(members, texts):
    cfg = ev.EvalConfig(objectives=("kl",), **CFG)
    return ev.evaluate(members, *texts, cfg, names=["a", "b"])


def test_table_columns_and_rows(result):
    md = result.markdown()
    header = md.splitlines()[0]
    for col in ("combiner", "NLL", "PPL", "inf rows", "NLL finite", "top-1", "ECE", "infeasible", "iters",
                "lambda", "tok/s"):
        assert f" {col} " in header
    names = [r["combiner"] for r in result.rows]
    for want in ("member a", "member b", "logit_average", "prob_average", "me", "prob_average (learned)",
                 "logit_average (learned)", "me (learned)", "bn:kl [hard=all]", "bn:kl [hard=all] +smooth",
                 "bn:kl [soft rho=1]", "bn:kl [soft rho=1] +smooth"):
        assert want in names, want
    assert f"bn:kl [hard={result.meta['best_member']}]" in names
    assert len(md.splitlines()) == len(result.rows) + 2
    for r in result.rows:
        if "nll" in r:
            assert r["rows"] == 20 and 0 <= r["top1"] <= 1 and 0 <= r["ece"] <= 1
            assert r["tok_s"] > 0


def test_me_row_is_prob_average(result):
    rows = {r["combiner"]: r for r in result.rows}
    for k in ev.METRICS:
        assert rows["me"][k] == rows["prob_average"][k]
        assert rows["me (learned)"][k] == rows["prob_average (learned)"][k]


def test_single_member_nll_equals_token_nll(members, texts):
    """Windowed, cached member rows score exactly what a plain forward pass scores."""
    _, test = texts
    data = ev.collect_logits(members, test, context=16, stride=8, positions=12, seed=3, progress=False)
    for i, m in enumerate(members):
        s = ev.row_scores(jax.nn.log_softmax(jnp.asarray(data.logits[i]), -1), data.targets)
        ref = []
        for t, j in zip(data.text, data.position):
            ids = test[t]
            start = int(ev.window_start(np.asarray([j]), ids.size, 16, 8)[0])
            assert j - start <= 16 and j - start >= 16 - 8 + 1 or start == 0
            ref.append(token_nll(m, ids[start : j + 1], chunk=16)[-1])
        np.testing.assert_allclose(-s.logp_target, ref, rtol=2e-5, atol=2e-5)
    # and with every target inside the first window: the whole-sequence token_nll
    ids = test[0][:17]
    data = ev.collect_logits(members, [ids], context=16, stride=8, positions=100, seed=0, progress=False)
    assert list(data.position) == list(range(1, 17))
    s = ev.row_scores(jax.nn.log_softmax(jnp.asarray(data.logits[1]), -1), data.targets)
    np.testing.assert_allclose(-s.logp_target, token_nll(members[1], ids), rtol=2e-5, atol=2e-5)


def test_member_row_matches_plain_forward(members, texts, result):
    _, test = texts
    data = ev.collect_logits(members, test, context=16, stride=8, positions=10, seed=0, split_code=2,
                             progress=False)
    ref = []
    for t, j in zip(data.text, data.position):
        start = int(ev.window_start(np.asarray([j]), test[t].size, 16, 8)[0])
        ref.append(token_nll(members[0], test[t][start : j + 1], chunk=16)[-1])
    row = next(r for r in result.rows if r["combiner"] == "member a")
    assert row["nll"] == pytest.approx(float(np.mean(ref)), rel=1e-5)


def test_smoothing_makes_nll_finite(result):
    rows = {r["combiner"]: r for r in result.rows}
    hard = rows["bn:kl [hard=all]"]
    # n * (d + 1) = 66 > v = 64: the all-hard set is infeasible and the LS fallback zeroes tokens
    assert hard["infeasible"] > 0.5
    assert hard["inf_rows"] > 0 and hard["nll"] == math.inf and math.isfinite(hard["nll_finite"])
    sm = rows["bn:kl [hard=all] +smooth"]
    assert sm["inf_rows"] == 0 and math.isfinite(sm["nll"]) and 0 < sm["lam"] < 1


def test_smoothing_equals_bottleneck_lam(members, texts):
    """The harness's post-hoc smoothing is exactly bottleneck(lam=...)."""
    _, test = texts
    data = ev.collect_logits(members, test, context=16, stride=8, positions=4, seed=0, progress=False)
    Ws = [np.asarray(m.head[...]) for m in members]
    bs = [np.asarray(m.bias[...]) for m in members]
    prob = make_problem(Ws, bs, hard=(), soft=(0, 1))
    star = ev.run_combiner(bottleneck(prob, "kl", rho=1.0), data.logits, 8).logp
    lam = 0.3
    direct = ev.run_combiner(bottleneck(prob, "kl", rho=1.0, lam=lam), data.logits, 8).logp
    lq = np.asarray(jax.nn.log_softmax(jnp.mean(jax.nn.log_softmax(jnp.asarray(data.logits), -1), 0), -1))
    np.testing.assert_allclose(ev.smooth_logp(star, lq, lam), direct, atol=1e-5)


def test_learned_beats_uniform_on_validation_choice(result):
    rows = {r["combiner"]: r for r in result.rows}
    w = rows["prob_average (learned)"]["params"]["weights"]
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-5
    assert "val NLL" in rows["prob_average (learned)"]["note"]


def test_seeded_rerun_identical(members, texts):
    # least_squares has no soft form: its row is reported as skipped, not raised
    cfg = ev.EvalConfig(objectives=("least_squares",), constraints=("soft",), **{**CFG, "learn": False})
    a = ev.evaluate(members, *texts, cfg, names=["a", "b"])
    b = ev.evaluate(members, *texts, cfg, names=["a", "b"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tok_s", "compile_s")} for r in rows]  # noqa: E731
    assert strip(a.rows) == strip(b.rows)
    assert a.rows[-1]["combiner"] == "bn:least_squares [soft rho=1]" and a.rows[-1]["note"].startswith("skipped")
    c = ev.evaluate(members, *texts, ev.EvalConfig(**{**dataclass_kw(cfg), "seed": 1}), names=["a", "b"])
    assert strip(c.rows) != strip(a.rows)  # the seed picks the positions


def dataclass_kw(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def test_ece_against_loop():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 500)
    correct = rng.uniform(0, 1, 500) < conf**2
    edges = np.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.sum() / 500 * abs(correct[sel].mean() - conf[sel].mean())
    assert ev.expected_calibration_error(conf, correct) == pytest.approx(ece)
    assert ev.expected_calibration_error(np.ones(10), np.ones(10, bool)) == 0.0


def test_json_and_plot(result, tmp_path):
    ev.write_json(result, tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["rows"][0]["combiner"] == "member a" and "config" in d and "meta" in d
    assert any(r.get("nll") == "inf" for r in d["rows"])
    pytest.importorskip("matplotlib")
    assert ev.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- bad inputs


def test_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        ev.read_text(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        ev.read_text(bad)
    with pytest.raises(ValueError, match="does not exist"):
        ev.read_text(tmp_path / "missing.txt")


def test_text_shorter_than_context(members):
    with pytest.raises(ValueError, match="fewer than context"):
        ev.collect_logits(members, [np.arange(10)], context=16, stride=8, positions=4, seed=0, progress=False)


def test_bad_config():
    with pytest.raises(ValueError, match="stride"):
        ev.EvalConfig(context=8, stride=16)
    with pytest.raises(ValueError, match="unknown bottleneck objective"):
        ev.EvalConfig(objectives=("nope",))
    with pytest.raises(ValueError, match="positions"):
        ev.EvalConfig(positions=0)


def test_cli_bad_inputs(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--member", "smollm2-135m", "--text", str(empty)])
    assert e.value.code == 2 and "is empty" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 50)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--member", "no-such-model", "--text", str(good), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no-such-model" in err and "nknown" in err
    with pytest.raises(SystemExit):
        main(["eval", "--constraints", "everything"])


def test_feasibility_first_rows_equal_the_combiner(members, texts):
    """``hard=all`` in the harness decides feasibility once per row and solves only the feasible
    rows; the result is what the combiner returns row by row (same statuses; the same
    distribution on feasible rows; on infeasible rows a least-squares point with the same residual)."""
    _, test = texts
    data = ev.collect_logits(members, test, context=16, stride=8, positions=10, seed=5, progress=False)
    Ws, bs = ev.unembeddings(members, V)
    problem = make_problem(Ws, bs, hard="all")
    comb = bottleneck(problem, "kl")
    fn = ev.jit_combiner(comb)
    ref = ev.run_combiner(comb, data.logits, 8, fn=fn)
    status, p_ls = ev.feasibility_rows(problem, data.logits, 8)
    lean = bottleneck(problem, "kl", check_feasibility=False)
    got = ev.run_feasible_rows(lean, data.logits, 8, ev.jit_combiner(lean), status, p_ls, 0.0)
    assert np.any(ref.status == 2), "the instance should have infeasible rows (two members, V=64 > 2d+1?)"
    np.testing.assert_array_equal(got.status, ref.status)
    feas = ref.status != 2
    np.testing.assert_allclose(np.exp(got.logp[feas]), np.exp(ref.logp[feas]), atol=1e-6)
    m = np.asarray(problem.moments(jax.nn.softmax(jnp.asarray(np.moveaxis(data.logits, 0, 1)), -1)))
    A = np.asarray(problem.A)
    res = lambda lp: np.linalg.norm(np.exp(lp) @ A - m, axis=-1)  # noqa: E731
    np.testing.assert_allclose(res(got.logp[~feas]), res(ref.logp[~feas]), rtol=1e-3, atol=1e-5)


def test_paired_differences_against_the_tuned_reference(result):
    rows = {r["combiner"]: r for r in result.rows}
    ref = rows[result.meta["reference"]]
    assert ref["kind"] == "learned" and ref["dnll"] == 0.0
    for r in result.rows:
        if "nll" in r and math.isfinite(r["nll"]):
            assert r["dnll"] == pytest.approx(r["nll"] - ref["nll"], abs=1e-9)
    assert "_lt" not in json.dumps(ev.json_safe(result.to_json()))
