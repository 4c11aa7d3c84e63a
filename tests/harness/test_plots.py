"""The eval plots: intervals, infinite rows as ``inf`` markers, labelled reference lines, zoomed axes."""

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jaxens.harness import plots  # noqa: E402
from jaxens.harness.reports import EvalResult  # noqa: E402


def test_bootstrap_interval_matches_the_normal_interval_for_many_positions():
    x = np.random.default_rng(1).exponential(size=4000)
    lo, hi = plots.bootstrap_interval(x, resamples=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)  # the central limit theorem's interval
    assert abs((hi - lo) / 2 - half) < 0.1 * half and lo < x.mean() < hi
    assert all(math.isnan(v) for v in plots.bootstrap_interval([1.0, math.inf]))


def test_interval_sources_in_order():
    base = {"nll": 3.0, "dnll": 0.5, "dnll_se": 0.1}
    assert plots.nll_interval({**base, "nll_ci_low": 2.9, "nll_ci_high": 3.2}) == ((2.9, 3.2), "carried")
    # ci_low / ci_high as the evaluation writes them: the interval of the difference to the reference
    assert plots.nll_interval({**base, "ci_low": 0.4, "ci_high": 0.7}) == (pytest.approx((2.9, 3.2)), "carried")
    assert plots.nll_interval({**base, "delta": 0.5, "ci_low": 0.4, "ci_high": 0.7})[0] == pytest.approx((2.9, 3.2))
    ci, src = plots.nll_interval({**base, "_lt": -np.linspace(2.0, 4.0, 200)})
    assert src == "bootstrap" and ci[0] < 3.0 < ci[1]
    assert plots.nll_interval(base) == (pytest.approx((3.0 - 0.196, 3.0 + 0.196), rel=1e-3), "paired s.e.")
    assert plots.nll_interval({"nll": math.inf, "dnll": math.inf, "dnll_se": math.nan}) == (None, "")


def _row(name, kind, nll, **kw):
    return {"combiner": name, "kind": kind, "nll": nll, "rows": 64, "inf_rows": 0 if math.isfinite(nll) else 5,
            "top1": 0.4, **kw}


def test_plot_eval_draws_inf_rows_as_such_on_a_zoomed_axis(tmp_path, monkeypatch):
    rows = [_row("member a", "member", 3.68, dnll=0.0, dnll_se=0.0),
            _row("member b", "member", 5.1, dnll=1.4, dnll_se=0.05),
            _row("logit_average (learned)", "learned", 3.66, dnll=0.0, dnll_se=0.0),
            _row("kl", "bottleneck", 3.75, dnll=0.09, dnll_se=0.02),
            _row("sum_ce", "bottleneck", math.inf, dnll=math.inf, dnll_se=math.nan)]
    result = EvalResult(rows, {}, {"members": ["a", "b"], "test_rows": 64, "reference": "logit_average (learned)"})
    figs = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figs.append(fig) or fig.savefig(path) or True)
    assert plots.plot_eval(result, tmp_path / "eval.png") and (tmp_path / "eval.png").stat().st_size > 0
    ax = figs[0].axes[0]
    lo, hi = ax.get_xlim()
    assert 3.0 < lo < 3.66 and hi > 5.1  # zoomed to the finite values, not from 0
    texts = [t.get_text() for t in ax.texts]
    assert any(t.strip().startswith("inf (5/64") for t in texts)  # the infinite row: a label, not a bar
    assert not ax.patches  # no bars at all
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("best member (member a)" in t for t in legend) and any("tuned reference" in t for t in legend)
    assert "paired s.e." in ax.get_xlabel()


def test_plot_bpb_inf_rows(tmp_path, monkeypatch):
    rows = [{"combiner": "smol (pivot)", "kind": "member", "bpb": 1.895, "zero": 0, "bpb_smoothed": None},
            {"combiner": "gac", "kind": "cross", "bpb": 1.815, "zero": 0, "bpb_smoothed": 1.815},
            {"combiner": "unite", "kind": "cross", "bpb": math.inf, "zero": 3, "bpb_smoothed": 1.9}]
    figs = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figs.append(fig) or True)
    plots.plot_bpb(EvalResult(rows, {}, {"members": ["smol", "gemma"], "bytes": 100, "texts": ["a"]}), tmp_path / "b.png")
    ax = figs[0].axes[0]
    assert any("inf (3 zero-prob; smoothed 1.900)" in t.get_text() for t in ax.texts)
    assert ax.get_xlim()[0] > 1.5 and not ax.patches


def test_without_matplotlib_plots_raise_naming_the_extra(no_matplotlib):
    with pytest.raises(ImportError, match=r"pip install 'jaxens\[plot\]'"):
        plots.pyplot()
