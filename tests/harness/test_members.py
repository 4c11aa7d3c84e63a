"""Small harness helpers: the atomic directory write, vocabulary sizes, the solver each objective
gets in the evaluation, and the CLI's option parsing."""

from __future__ import annotations

import dataclasses

import pytest

from jaxens.cli.generate import _parse_hard
from jaxens.cli.vocab import parse_vocab_options
from jaxens.solvers.defaults import default_solver
from jaxens.harness.evaluate import EvalConfig, least_squares_solver, solver_for
from jaxens.harness.files import atomic_directory
from jaxens.harness.members import tokenizer_vocab_size, vocabularies_differ
from jaxens.solvers.entropic_newton import EntropicNewton
from jaxens.solvers.working_set import WorkingSet


def test_atomic_directory_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "d"
    with atomic_directory(out, file_mode=0o644) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and (out.stat().st_mode & 0o777) == 0o755
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # the old directory is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary left behind
    with atomic_directory(out) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["c"]


def test_vocabulary_sizes():
    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    class NoLen:
        vocab_size = 7

    class Cfg:
        vocab_size = 9

    class Member:
        config = Cfg()

    assert tokenizer_vocab_size(None, Tok(5)) == 5
    assert tokenizer_vocab_size(None, NoLen()) == 7
    assert tokenizer_vocab_size(Member(), object()) == 9
    assert tokenizer_vocab_size(object(), object()) is None
    assert vocabularies_differ([(None, Tok(5)), (None, Tok(6))])
    assert not vocabularies_differ([(None, Tok(5)), (None, Tok(5))])
    assert not vocabularies_differ([(None, Tok(5)), (object(), object())])  # unknown size: no verdict


def test_eval_solvers_are_the_defaults_with_the_config_caps():
    cfg = EvalConfig()
    assert solver_for("kl", cfg) == EntropicNewton(hessian_topk=2048)
    assert solver_for("max_entropy", cfg) == EntropicNewton(hessian_topk=2048)
    for o in ("sum_ce", "sum_sq_ce"):  # WorkingSet: capped by its rounds, not max_iters
        assert solver_for(o, cfg) == WorkingSet()
    assert solver_for("min_underestimation", cfg) == default_solver("min_underestimation")
    assert solver_for("least_squares", cfg) == default_solver("least_squares")
    free = EvalConfig(hessian_topk=None, max_iters=None)
    assert solver_for("kl", free) == EntropicNewton() and solver_for("min_underestimation", free) == default_solver("min_underestimation")
    assert least_squares_solver(cfg) is None and least_squares_solver(free) is None  # MinNormPoint
    assert default_solver("kl", hessian_topk=8) == dataclasses.replace(EntropicNewton(), hessian_topk=8)


def test_cli_option_parsing():
    assert _parse_hard(["ALL"]) == "all" and _parse_hard(["none"]) == "none" and _parse_hard(["0", "2"]) == (0, 2)
    with pytest.raises(ValueError, match="--hard takes"):
        _parse_hard(["0", "x"])
    assert parse_vocab_options(["k=10", "mode=topk"]) == {"k": 10, "mode": "topk"}
    assert parse_vocab_options(["unite.k=2", "lam=0.5"], ("unite", "gac")) == {"unite": {"k": 2, "lam": 0.5},
                                                                              "gac": {"lam": 0.5}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_vocab_options(["k"])
    with pytest.raises(ValueError, match="unknown method"):
        parse_vocab_options(["nope.k=1"], ("unite",))


def test_member_paths_that_do_not_load_say_why(tmp_path):
    from jaxens.harness.members import load_member

    with pytest.raises(ValueError, match="file not found"):
        load_member(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="file not found"):
        load_member("./no/such/dir")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="convert it to safetensors"):
        load_member(str(pt))
