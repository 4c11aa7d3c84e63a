"""`jaxens eval` runs that survive and tell: finished rows on disk and resumed (RowStore), the
paired bootstrap intervals, the warning on few validation rows and the best member beside the
tuned reference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxens.harness import evaluate as ev
from jaxens.harness.evaluate import rows as ev_rows
from jaxens.harness.evaluate import run as ev_run
from jaxens.harness.evaluate.metrics import paired_bootstrap
from jaxens.harness.evaluate.run import FewValidationRowsWarning
from toy_models import ToyConfig, ToyLM

pytestmark = pytest.mark.filterwarnings("ignore::jaxens.harness.evaluate.run.FewValidationRowsWarning")
V = 64
CFG = dict(context=16, stride=8, positions=10, val_positions=8, batch_rows=8, learn_steps=10, progress=False,
           objectives=("kl",), constraints=("soft",))


@pytest.fixture(scope="module")
def setup():
    c = ToyConfig(vocab_size=V, max_position_embeddings=64)
    rng = np.random.default_rng(7)
    val = [rng.integers(0, V, 40), rng.integers(0, V, 33)]
    test = [rng.integers(0, V, 50), rng.integers(0, V, 45)]
    return [ToyLM(c, seed=0), ToyLM(c, seed=1)], val, test


def test_rows_written_as_they_finish_and_resumed(setup, tmp_path, monkeypatch):
    members, val, test = setup
    cfg = ev.EvalConfig(**CFG)
    a = ev.evaluate(members, val, test, cfg, names=["a", "b"], store=tmp_path)
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(lines) == len(a.rows) and "bn:kl [soft rho=1] +smooth" in (tmp_path / "table.md").read_text()
    # same settings: nothing is solved again (the bottleneck runner would raise) and the table is the same
    monkeypatch.setattr(ev_rows, "run_combiner", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-solved")))
    logs = []
    b = ev.evaluate(members, val, test, cfg, names=["a", "b"], store=tmp_path, log=logs.append)
    assert any(f"resuming: {len(a.rows)} finished rows" in m for m in logs)
    assert json.dumps(ev.json_safe(a.rows)) == json.dumps(ev.json_safe(b.rows))
    monkeypatch.undo()
    # a run cut short: the missing rows alone are computed
    (tmp_path / "rows.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    c = ev.evaluate(members, val, test, cfg, names=["a", "b"], store=tmp_path)
    assert [r["combiner"] for r in c.rows] == [r["combiner"] for r in a.rows]
    assert c.rows[-1]["nll"] == pytest.approx(a.rows[-1]["nll"], abs=1e-6)
    # more rows (another constraint set): the finished rows are reused, the new ones added
    monkeypatch.setattr(ev_run, "average_rows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    e = ev.evaluate(members, val, test, ev.EvalConfig(**{**CFG, "constraints": ("soft", "best")}), names=["a", "b"],
                    store=tmp_path)
    assert [r["combiner"] for r in e.rows][: len(a.rows)] == [r["combiner"] for r in a.rows]
    assert len(e.rows) == len(a.rows) + 2
    monkeypatch.undo()
    # other settings: the store starts afresh (the old rows are not reused)
    d = ev.evaluate(members, val, test, ev.EvalConfig(**{**CFG, "seed": 1}), names=["a", "b"], store=tmp_path)
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(d.rows)
    assert d.rows[0]["nll"] != a.rows[0]["nll"]


def test_intervals_in_rows_and_table(setup):
    members, val, test = setup
    res = ev.evaluate(members, val, test, ev.EvalConfig(**CFG), names=["a", "b"])
    ref = {r["combiner"]: r for r in res.rows}[res.meta["reference"]]
    assert ref["delta"] == 0.0 and ref["ci_low"] == 0.0 == ref["ci_high"]
    finite = [r for r in res.rows if "nll" in r and np.isfinite(r["delta"])]
    assert len(finite) >= 6
    for r in finite:
        assert r["ci_low"] <= r["delta"] <= r["ci_high"]
        assert r["delta"] == pytest.approx(r["nll"] - ref["nll"], abs=1e-9)
    assert "[95% CI]" in res.markdown() and f"[{finite[0]['ci_low']:+.4f}, " in res.markdown()
    m = res.meta
    assert m["best_member"] in ("a", "b") and m["best_member_test"] in ("a", "b")
    assert set(m["best_member_vs_reference"]) == {"delta", "ci_low", "ci_high"}


def test_few_validation_rows_warn(setup):
    members, val, test = setup
    with pytest.warns(FewValidationRowsWarning, match="validation rows"):
        ev.evaluate(members, val, test, ev.EvalConfig(**{**CFG, "objectives": (), "learn": False}), names=["a", "b"])


def test_bootstrap_against_scipy_and_blocks():
    """Rows as their own blocks: the percentile interval of scipy.stats.bootstrap (to Monte Carlo
    error); each value repeated in a block of 4: the interval of the values themselves, exactly."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    d = rng.standard_t(4, 400) * 0.3 + 0.05
    lo, hi = paired_bootstrap(d, np.arange(d.size), resamples=4000, seed=1)
    ref = stats.bootstrap((d,), np.mean, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.1 * width and abs(hi - ref.high) < 0.1 * width
    blocks = np.repeat(np.arange(d.size), 4)
    assert paired_bootstrap(np.repeat(d, 4), blocks, resamples=4000, seed=1) == pytest.approx((lo, hi), abs=1e-12)
    # dependent rows (a shared offset per block) widen the block interval against the per-row one
    shared = np.repeat(rng.normal(0, 1, 50), 8) + rng.normal(0, 0.1, 400)
    b = np.repeat(np.arange(50), 8)
    wb = np.subtract(*paired_bootstrap(shared, b)[::-1])
    wr = np.subtract(*paired_bootstrap(shared, np.arange(400))[::-1])
    assert wb > 2 * wr
