"""`jaxens generate` with toy members (the loader is monkeypatched) and, if cached, a zoo model."""

import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM

import jaxens.cli as cli
from jaxens.cli import generate
from jaxens.harness import members
from jaxens.combiners.averaging import prob_average
from jaxens.decode import Decoder
from jaxens.sampling import Sampler


class CharTokenizer:
    """Characters 'a'..'z', ' ', '.' -> ids 1..28; 0 is EOS."""

    alphabet = "abcdefghijklmnopqrstuvwxyz ."
    eos_token_id = 0
    bos_token_id = None
    pad_token_id = None

    def __init__(self, shift=0):
        self.shift = shift

    def encode(self, text):
        return [self.alphabet.index(c) + 1 + self.shift for c in text.lower() if c in self.alphabet]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i - 1] if 1 <= i <= 28 else f"<{i}>" for i in ids if i != 0)


MODELS = {"toy0": ToyLM(ToyConfig(), seed=0), "toy1": ToyLM(ToyConfig(), seed=1)}


@pytest.fixture(autouse=True)
def toy_loader(monkeypatch):
    def load(spec, dtype="float32"):
        if spec == "shifted":
            return MODELS["toy1"], CharTokenizer(shift=1)
        if spec not in MODELS:
            raise ValueError(f"Unknown zoo model {spec!r}; known models: toy0, toy1")
        return MODELS[spec], CharTokenizer()

    monkeypatch.setattr(members, "load_member", load)


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected(prompts, n, weights=None, **sampler):
    tok = CharTokenizer()
    dec = Decoder(list(MODELS.values()), prob_average(None if weights is None else np.asarray(weights)),
                  Sampler(**sampler), stop_tokens=(0,), pad_id=0)
    out = dec.generate([tok.encode(p) for p in prompts], n, seed=0)
    return [tok.decode(out.tokens[b, : out.lengths[b]].tolist()) for b in range(len(prompts))]


def test_generate_streams_single_prompt(capsys):
    code, out, err = run(["generate", "--member", "toy0", "--member", "toy1", "--combiner", "prob_average",
                          "--weights", "0.3", "0.7", "--greedy", "--max-new-tokens", "12",
                          "--prompt", "hello world", "--chunk-steps", "3", "--stats"], capsys)
    assert code == 0
    assert out == expected(["hello world"], 12, weights=[0.3, 0.7], greedy=True)[0] + "\n"
    assert "tok/s" in err and "nonfinite" in err


def test_generate_batch_from_file(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("the cat\n\nsat on the mat.\n")
    code, out, _ = run(["generate", "--member", "toy0", "--member", "toy1", "--combiner", "prob_average",
                        "--top-k", "5", "--temperature", "0.8", "--max-new-tokens", "8", "--prompt-file", str(f)],
                       capsys)
    assert code == 0
    texts = expected(["the cat", "sat on the mat."], 8, top_k=5, temperature=0.8)
    assert out == f"### prompt 0\n{texts[0]}\n### prompt 1\n{texts[1]}\n"


def test_me_from_cli(capsys):
    code, out, err = run(["generate", "--member", "toy0", "--member", "toy1", "--combiner", "me",
                          "--temperature", "0.7", "--max-new-tokens", "6", "--prompt", "abc", "--stats"], capsys)
    assert code == 0 and "ME" in err and "draws" in err
    code, out, _ = run(["generate", "--member", "toy0", "--member", "toy1", "--combiner", "me", "--me-per-member",
                        "--greedy", "--max-new-tokens", "4", "--prompt", "abc"], capsys)
    assert code == 0


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--combiner", "nope", "--prompt", "a"], "unknown combiner 'nope'; known combiners: .*logit_average.*me"),
        (["--weights", "1", "--prompt", "a"], "--weights has 1 values for 2 members"),
        (["--combiner", "me", "--top-p", "0.9", "--prompt", "a"], "prob_average combiner in the ordinary decode loop"),
        (["--top-p", "1.5", "--prompt", "a"], r"top_p must be in \(0, 1\], got 1.5"),
        (["--prompt", "!!!"], "encodes to no tokens"),
        (["--max-new-tokens", "-1", "--prompt", "a"], "--max-new-tokens must be >= 1"),
        (["--max-new-tokens", "0", "--prompt", "a"], "--max-new-tokens must be >= 1, got 0"),
        (["--prompt", ""], "--prompt 0 is empty"),
        (["--prompt", "a", "--prompt", ""], "--prompt 1 is empty"),
        (["--weights", "-1", "2", "--prompt", "a"],
         r"--weights: weights must be finite, >= 0 and not all zero \(a weight is negative\), got \[-1.0, 2.0\]"),
        (["--weights", "0", "0", "--prompt", "a"], r"--weights: .*\(all weights are zero\).*pass one finite weight"),
        (["--weights", "nan", "1", "--prompt", "a"], r"--weights: .*\(a weight is NaN or infinite\)"),
        (["--combiner", "bottleneck-kl", "--hard", "0", "--soft", "1", "--rho", "-1", "--prompt", "a"],
         r"rho \(soft-constraint strength\) must be finite and >= 0"),
    ],
)
def test_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--member", "toy0", "--member", "toy1"] + argv)
    assert e.value.code == 2
    import re

    assert re.search(msg, capsys.readouterr().err)


def test_tokenizer_mismatch_and_unknown_member(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--member", "toy0", "--member", "shifted", "--prompt", "abc"])
    assert "tokenizes prompt 0 differently" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--member", "toy9", "--prompt", "abc"])
    assert "Unknown zoo model 'toy9'" in capsys.readouterr().err


def test_list_combiners_and_subcommand_required(capsys):
    code, out, _ = run(["generate", "--member", "toy0", "--list-combiners"], capsys)
    assert code == 0 and {"logit_average", "prob_average", "me"} <= set(out.split())
    # alone, without members: every combiner, one line each, the cross-tokenizer methods too
    code, alone, _ = run(["generate", "--list-combiners"], capsys)
    assert code == 0 and alone == out
    names = {line.split()[0] for line in alone.splitlines() if line.startswith("  ")}
    assert {"bottleneck-kl", "bottleneck-sum_ce", "gac", "unite", "deepen", "safe"} <= names
    assert all(len(line.split()) > 1 for line in alone.splitlines() if line.startswith("  "))
    with pytest.raises(SystemExit):
        cli.main(["generate", "--prompt", "abc"])
    assert "--member is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.models
@pytest.mark.slow
def test_zoo_smollm2_generate(capsys, monkeypatch):
    monkeypatch.undo()
    from jaxens.harness import zoo

    if not (zoo.cache_root() / "zoo" / "smollm2-135m" / "hf" / "config.json").is_file():
        pytest.skip("smollm2-135m not in the cache")
    code, out, _ = run(["generate", "--member", "smollm2-135m", "--greedy", "--max-new-tokens", "8",
                        "--prompt", "The capital of France is"], capsys)
    assert code == 0 and len(out.strip()) > 0


def test_text_stream_holds_back_partial_utf8_and_flushes():
    import io

    class ByteTok:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    buf = io.StringIO()
    s = generate._TextStream(ByteTok(), buf)
    s.add(list("ab".encode()))
    e = "é".encode()
    s.add([e[0]])  # incomplete character: nothing printed
    assert buf.getvalue() == "ab"
    s.add([e[1]] + list(b"c"))
    s.finish()
    assert buf.getvalue() == "abéc"
    s2 = generate._TextStream(ByteTok(), io.StringIO())
    s2.add([e[0]])
    s2.finish()  # a trailing incomplete sequence is still flushed at the end
    assert s2.out.getvalue() == "\ufffd"


def test_bottleneck_from_cli(capsys):
    base = ["generate", "--member", "toy0", "--member", "toy1", "--greedy", "--max-new-tokens", "6",
            "--prompt", "hello", "--weights", "0.6", "0.4"]
    _, ref, _ = run(base + ["--combiner", "logit_average"], capsys)
    code, out, err = run(base + ["--combiner", "bottleneck-kl", "--hard", "none", "--stats"], capsys)
    assert code == 0 and out == ref and "status" in err
    opts = generate._bottleneck_options(cli.build_parser().parse_args(
        ["generate", "--member", "a", "--combiner", "bottleneck-sum_ce", "--hard", "0", "--soft", "1",
         "--rho", "2.5", "--lam", "0.1"]))
    assert opts == {"hard": (0,), "soft": (1,), "rho": 2.5, "lam": 0.1, "vocab_size": None}
    with pytest.raises(SystemExit):
        cli.main(base + ["--combiner", "logit_average", "--rho", "1"])
    assert "only apply to the bottleneck" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--combiner", "bottleneck-kl", "--hard", "x"])
    assert "--hard takes 'all', 'none' or member indices" in capsys.readouterr().err
    # the top-k Hessian: same greedy tokens (the same solution, to the solver's tolerance)
    code, out, _ = run(base + ["--combiner", "bottleneck-kl", "--hard", "0", "--hessian-topk", "8"], capsys)
    _, full, _ = run(base + ["--combiner", "bottleneck-kl", "--hard", "0"], capsys)
    assert code == 0 and out == full
    from jaxens.solvers.entropic_newton import EntropicNewton

    opts = generate._bottleneck_options(cli.build_parser().parse_args(
        ["generate", "--member", "a", "--combiner", "bottleneck-kl", "--hessian-topk", "2048"]))
    assert opts["solver"] == EntropicNewton(hessian_topk=2048)
    for combiner, msg in (("bottleneck-sum_ce", "applies to bottleneck-kl"), ("logit_average", "only apply to")):
        with pytest.raises(SystemExit):
            cli.main(base + ["--combiner", combiner, "--hessian-topk", "8"])
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-new-tokens", "0", "--prompt", "a"], ["--prompt", ""],
                                  ["--weights", "1", "-1", "--prompt", "a"]])
def test_bad_arguments_fail_before_any_member_loads(argv, monkeypatch, capsys):
    def load(spec, dtype="float32"):
        raise AssertionError("a member was loaded")

    monkeypatch.setattr(members, "load_member", load)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--member", "toy0", "--member", "toy1"] + argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_oserror_is_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # a directory as the prompt file: IsADirectoryError
        cli.main(["generate", "--member", "toy0", "--prompt-file", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("jaxens generate: error: ") and str(tmp_path) in err and "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["generate", "--member", "smollm2-135m", "--prompt", "a"],
    ["generate", "--member", "smollm2-135m", "--member", "gemma3-270m", "--combiner", "gac", "--prompt", "a"],
    ["eval", "--member", "smollm2-135m"],
    ["train", "--zoo", "smollm2-tiny-64"],
])
@pytest.mark.parametrize("kind", ["file", "below-a-file"])
def test_bad_jaxens_cache_is_one_line_from_every_command(command, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.undo()  # the real loader and zoo
    (tmp_path / "f").write_text("x")
    bad = tmp_path / "f" if kind == "file" else tmp_path / "f" / "sub"
    monkeypatch.setenv("JAXENS_CACHE", str(bad))
    if command[0] == "eval":
        (tmp_path / "t.txt").write_text("some text " * 50)
        command = command + ["--text", str(tmp_path / "t.txt")]
    with pytest.raises(SystemExit) as e:
        cli.main(command)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"JAXENS_CACHE ({bad}) cannot be used as the jaxens cache" in err
    assert "set JAXENS_CACHE to a writable directory" in err


def test_eval_names_a_missing_member_once(tmp_path, monkeypatch, capsys):
    monkeypatch.undo()
    (tmp_path / "t.txt").write_text("some text " * 50)
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--member", missing, "--text", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert err.count(f"member {missing!r}") == 1 and "file not found" in err
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--member", str(pt), "--prompt", "a"])
    assert "convert it to safetensors" in capsys.readouterr().err
