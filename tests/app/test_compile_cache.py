"""The ``jaxens`` command compiles once and is quiet: two fresh processes run the same tiny
``jaxens generate`` over one persistent cache folder; the second loads every executable from it
(no miss), and neither prints a third-party notice, on a machine without PyTorch (simulated:
``sys.modules["torch"] = None`` hides it from transformers' check)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

import jaxens.cli as cli
from jaxens.harness import compile_cache
from jaxens.models.llama import Llama, LlamaConfig
from jaxens.models.loading import save_hf_dir

ROOT = Path(__file__).resolve().parents[2]
NO_TORCH = "import sys; sys.modules['torch'] = None\n"
CHILD = NO_TORCH + """
import json, jax
counts = {"hits": 0, "misses": 0}
def on_event(event, **_):
    for k in counts:
        if event == f"/jax/compilation_cache/cache_{k}":
            counts[k] += 1
jax.monitoring.register_event_listener(on_event)
from jaxens.cli import main
try:
    main(["generate", "--help"])
except SystemExit:
    pass
code = main(["generate", "--member", sys.argv[1], "--prompt", "a b c", "--max-new-tokens", "4", "--greedy"])
print(json.dumps(counts))
sys.exit(code)
"""


def _tiny_member_dir(path: Path) -> Path:
    """A Hugging Face directory: a random tiny llama and a word-level ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = LlamaConfig.tiny()
    save_hf_dir(Llama(cfg, rngs=nnx.Rngs(0)), path)
    words = ["<unk>", "</s>"] + [chr(ord("a") + i) for i in range(26)]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(cfg.vocab_size - len(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def _run(code: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "TOKENIZERS_"))}
    env |= {"PYTHONPATH": str(ROOT), "JAXENS_COMPILE_CACHE": str(cache) if cache else "0", "JAXENS_TYPECHECK": "0"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_cache")
    member = _tiny_member_dir(root / "tiny")
    cache = root / "xla"
    runs = []
    for _ in range(2):
        p = _run(CHILD, str(member), cache=cache)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append((p, json.loads(p.stdout.strip().splitlines()[-1]), sorted(cache.iterdir())))
    return runs


def test_second_process_loads_every_executable_from_the_cache(two_runs):
    (_, first, entries1), (_, second, entries2) = two_runs
    assert first["misses"] > 0 and first["hits"] == 0 and len(entries1) == first["misses"]
    # same programs, same keys: nothing compiles again and nothing new is written
    assert second == {"hits": first["misses"], "misses": 0}
    assert entries2 == entries1


def test_no_third_party_notice_on_stderr(two_runs):
    # the notice the command hides is really printed by transformers on this setup
    bare = _run(NO_TORCH + "import transformers")
    assert "PyTorch was not found" in bare.stderr
    for proc, _, _ in two_runs:
        assert "usage: jaxens generate" in proc.stdout
        others = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[jaxens]")]
        assert others == []


def test_cache_folder_flag_and_off_switch(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXENS_CACHE", str(tmp_path / "root"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.compile_cache_dir() == tmp_path / "root" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.compile_cache_dir() == tmp_path / "mine"
    assert compile_cache.compile_cache_dir(tmp_path / "given") == tmp_path / "given"
    for off in ("0", "off", "OFF", "false", "no"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.compile_cache_dir() is None and compile_cache.enable_compile_cache() is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be created.*JAXENS_COMPILE_CACHE=0"):
        compile_cache.enable_compile_cache(tmp_path / "file" / "xla")
    # the CLI turns it on unless --no-compile-cache
    calls = []
    monkeypatch.setattr(cli, "enable_compile_cache", lambda: calls.append(1))
    assert cli.main(["generate", "--list-combiners"]) == 0 and calls == [1]
    assert cli.main(["generate", "--list-combiners", "--no-compile-cache"]) == 0 and calls == [1]
