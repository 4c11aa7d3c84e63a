"""`jaxens generate` with toy members (the loader is monkeypatched) and, if cached, a zoo model."""

import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM

import jaxens.cli as cli
from jaxens.cli import generate, output, stats
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
    completion = expected(["hello world"], 12, weights=[0.3, 0.7], greedy=True)[0]
    assert out == f"### prompt\nhello world\n### completion\n{completion}\n"  # the prompt echoed, then streamed
    # compile apart from the decode speed; diagnostics by name, not raw arrays
    assert "first token after" in err and "(compile + prefill)" in err and "tok/s" in err
    assert "nonfinite=0" in err and "array(" not in err


def test_generate_batch_from_file(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("the cat\n\nsat on the mat.\n")
    code, out, _ = run(["generate", "--member", "toy0", "--member", "toy1", "--combiner", "prob_average",
                        "--top-k", "5", "--temperature", "0.8", "--max-new-tokens", "8", "--prompt-file", str(f)],
                       capsys)
    assert code == 0
    texts = expected(["the cat", "sat on the mat."], 8, top_k=5, temperature=0.8)
    assert out == (f"### prompt 0\nthe cat\n### completion 0\n{texts[0]}\n"
                   f"### prompt 1\nsat on the mat.\n### completion 1\n{texts[1]}\n")


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
        (["--combiner", "me", "--top-p", "0.9", "--prompt", "a"], "use --combiner prob_average for --top-p of the"),
        (["--combiner", "me", "--greedy", "--prompt", "a"], "or add --me-per-member"),
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
    assert "tokenizes prompt 0 differently" in (e := capsys.readouterr().err) and "--combiner gac" in e
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
    s = output.TextStream(ByteTok(), buf)
    s.add(list("ab".encode()))
    e = "é".encode()
    s.add([e[0]])  # incomplete character: nothing printed
    assert buf.getvalue() == "ab"
    s.add([e[1]] + list(b"c"))
    s.finish()
    assert buf.getvalue() == "abéc"
    s2 = output.TextStream(ByteTok(), io.StringIO())
    s2.add([e[0]])
    s2.finish()  # a trailing incomplete sequence is still flushed at the end
    assert s2.out.getvalue() == "\ufffd"


def test_bottleneck_from_cli(capsys):
    base = ["generate", "--member", "toy0", "--member", "toy1", "--greedy", "--max-new-tokens", "6",
            "--prompt", "hello", "--weights", "0.6", "0.4"]
    _, ref, _ = run(base + ["--combiner", "logit_average"], capsys)
    code, out, err = run(base + ["--combiner", "bottleneck-kl", "--hard", "none", "--stats"], capsys)
    assert code == 0 and out == ref and "status" in err
    code, out, err = run(base + ["--combiner", "bottleneck-kl", "--hard", "0", "--stats"], capsys)
    # statuses by name, summed over rows and steps (1 row x 6 steps)
    assert code == 0 and "status SOLVED=6 MAX_ITERS=0 INFEASIBLE=0" in err and "array(" not in err
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


def test_jsonl_from_prompts_file_in_batches(tmp_path, capsys):
    import json

    f = tmp_path / "prompts.txt"
    f.write_text("the cat\nsat on\nthe mat\n")
    base = ["generate", "--member", "toy0", "--member", "toy1", "--combiner", "prob_average", "--greedy",
            "--max-new-tokens", "5", "--prompts-file", str(f), "--batch-size", "2"]
    code, out, _ = run(base + ["--jsonl", str(tmp_path / "out.jsonl")], capsys)
    recs = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = expected(["the cat", "sat on", "the mat"], 5, greedy=True)  # greedy rows do not depend on the batch
    assert code == 0 and [r["prompt"] for r in recs] == ["the cat", "sat on", "the mat"]
    assert [r["completion"] for r in recs] == want
    assert "### prompt 2\nthe mat\n### completion 2\n" in out  # the text output too
    tok = CharTokenizer()
    for r in recs:
        assert tok.decode(r["tokens"]) == r["completion"] and len(r["tokens"]) <= 5
        assert set(r["timings"]) == {"compile_s", "decode_s", "tok_per_s", "batch"}
        assert r["timings"]["compile_s"] > 0 and r["combiner"] == "prob_average"
        assert r["stats"]["nonfinite"] == 0 and r["stats"]["bad_members"] == 0
        assert r["stats"]["status"]["NONFINITE_INPUT"] == 0 and sum(r["stats"]["status"].values()) == len(r["tokens"])
    assert [r["timings"]["batch"] for r in recs] == [2, 2, 1]
    code, out, _ = run(base + ["--jsonl", "-"], capsys)  # stdout: JSON only
    assert code == 0 and [json.loads(line)["completion"] for line in out.splitlines()] == want


def test_compile_notice_after_silence(monkeypatch, capsys):
    monkeypatch.setattr(stats, "NOTICE_AFTER_S", 0.0)
    code, _, err = run(["generate", "--member", "toy0", "--combiner", "logit_average", "--greedy",
                        "--max-new-tokens", "3", "--prompt", "abc"], capsys)
    assert code == 0 and "[jaxens] compiling the decode loop (first run; cached afterwards)" in err
    monkeypatch.setattr(stats, "NOTICE_AFTER_S", 60.0)
    code, _, err = run(["generate", "--member", "toy0", "--combiner", "logit_average", "--greedy",
                        "--max-new-tokens", "3", "--prompt", "abc"], capsys)
    assert code == 0 and "compiling" not in err  # a quick start says nothing


class ChatTokenizer(CharTokenizer):
    chat_template = "user: {{ content }}. bot:"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return f"user {messages[0]['content']}. bot "


def test_chat_template(monkeypatch, capsys):
    def load(spec, dtype="float32"):
        return MODELS["toy0" if spec != "toy1" else "toy1"], ChatTokenizer() if spec == "chat" else CharTokenizer()

    monkeypatch.setattr(members, "load_member", load)
    base = ["generate", "--combiner", "prob_average", "--greedy", "--max-new-tokens", "4", "--prompt", "hi there"]
    code, out, _ = run(base + ["--member", "toy1", "--member", "chat", "--chat"], capsys)
    want = expected(["user hi there. bot "], 4, greedy=True)[0]
    assert code == 0 and out == f"### prompt\nhi there\n### completion\n{want}\n"  # echoes the user's prompt
    with pytest.raises(SystemExit):
        cli.main(base + ["--member", "toy0", "--member", "toy1", "--chat"])
    assert "no member's tokenizer has a chat template (toy0, toy1)" in capsys.readouterr().err


def test_one_me_rule_across_tokenizers(monkeypatch, capsys):
    class Sized(CharTokenizer):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def __len__(self):
            return self.n

    monkeypatch.setattr(members, "load_member", lambda spec, dtype="float32": (MODELS["toy0"], Sized(len(spec))))
    for flags, msg in ((["--combiner", "me", "--greedy"], "use --combiner gac for --greedy"),
                       (["--combiner", "logit_average"], "vocabularies differ .*--combiner gac")):
        with pytest.raises(SystemExit) as e:
            cli.main(["generate", "--member", "ab", "--member", "abc", "--prompt", "x"] + flags)
        assert e.value.code == 2
        import re

        assert re.search(msg, capsys.readouterr().err)


def test_eval_plot_without_matplotlib_is_an_error(no_matplotlib, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--member", "toy0", "--plot", str(tmp_path / "eval.png")])
    assert e.value.code == 2  # before any member is loaded
    assert "pip install 'jaxens[plot]'" in capsys.readouterr().err and not (tmp_path / "eval.png").exists()


@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    want = {"generate": "(default: logit_average)", "eval": "(default: 128)", "train": "(default: 300)"}[command]
    assert want in text


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
