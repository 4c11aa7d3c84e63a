"""Training a member from scratch: a short run lowers the loss on the real training text, is
deterministic, saves a checkpoint that reloads (jaxens and transformers) with the same logits; the
zoo's trained members: trained once, cached, a stale cache (recipe or data changed) retrained."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxens.harness import data, train
from jaxens.models.loading import load_hf_dir

# A stand-in for the 49,152-token vocabulary: the UTF-8 bytes of the real text (vocab 256).
TINY = train.TrainConfig(d_model=32, n_layers=1, head_dim=16, vocab_size=256, seq_len=64, batch_size=8,
                         steps=20, learning_rate=1e-2, warmup_steps=2, eval_every=10, eval_windows=4)


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


@pytest.fixture(scope="module")
def alice_bytes(alice_text):
    parts = data.split_text(alice_text)
    return _bytes(parts["train"]), _bytes(parts["validation"])


@pytest.fixture(scope="module")
def trained(alice_bytes):
    tr, va = alice_bytes
    return train.train_member(TINY, tr, va, progress=False)


def test_twenty_steps_lower_the_loss_on_the_training_text(trained, alice_bytes):
    tr, va = alice_bytes
    init = train.init_params(TINY.model_config(), jax.random.key(TINY.seed), TINY.init_std)
    final = {k: jnp.asarray(v) for k, v in trained.model.params_numpy().items()}
    windows = train.eval_windows(tr, TINY.seq_len, 16)
    before, after = train.mean_loss(TINY, init, windows), train.mean_loss(TINY, final, windows)
    assert abs(before - np.log(256)) < 0.3  # near uniform at initialisation
    assert after < before - 1.0, (before, after)
    vals = [h["val_loss"] for h in trained.history if "val_loss" in h]
    assert len(vals) == 2 and vals[-1] < before - 1.0
    assert [h["step"] for h in trained.history] == list(range(1, TINY.steps + 1))


def test_training_is_deterministic(trained, alice_bytes):
    again = train.train_member(TINY, *alice_bytes, progress=False)
    for k, v in trained.model.params_numpy().items():
        np.testing.assert_array_equal(v, again.model.params_numpy()[k], err_msg=k)
    other = train.train_member(train.TrainConfig(**{**TINY.to_dict(), "seed": 1, "steps": 2, "warmup_steps": 1}),
                               *alice_bytes, progress=False)
    assert not np.array_equal(other.model.params_numpy()["embed"], trained.model.params_numpy()["embed"])


def test_saved_checkpoint_reloads_with_identical_logits(trained, tmp_path):
    path = train.save_member(trained, TINY, tmp_path / "member", extra={"note": "test"})
    meta = json.loads((path / train.META_FILE).read_text())
    assert train.TrainConfig.from_dict(meta["recipe"]) == TINY and meta["note"] == "test"
    loaded = load_hf_dir(path)
    assert loaded.config == trained.model.config
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)), jnp.int32)
    a = train.forward_logits(trained.model.config, {k: jnp.asarray(v) for k, v in trained.model.params_numpy().items()}, tokens)
    b = train.forward_logits(loaded.config, {k: jnp.asarray(v) for k, v in loaded.params_numpy().items()}, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads the same directory and computes the same logits
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(np.array(tokens), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(a), ref, rtol=1e-4, atol=1e-4)
    # saving again replaces the directory atomically
    assert train.save_member(trained, TINY, path) == path and not list(tmp_path.glob(".member-*"))


def test_window_perplexity_matches_windowed_sequence_nll(trained, alice_bytes):
    from jaxens.models.forward import sequence_nll

    ids = alice_bytes[1][:300]
    t = 64
    total, count = 0.0, 0
    for lo in range(0, ids.size - 1, t):
        nll, c = sequence_nll(trained.model, ids[lo:lo + t + 1], chunk=128)
        total, count = total + nll, count + c
    assert count == ids.size - 1
    got = train.window_perplexity(trained.model, ids, t)
    np.testing.assert_allclose(got, np.exp(total / count), rtol=1e-5)


def test_bad_training_inputs():
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        train.train_member(TINY, np.array([0, 1, 300] * 100), progress=False)
    with pytest.raises(ValueError, match="longer than seq_len"):
        train.train_member(TINY, np.arange(10), progress=False)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        train.TrainConfig(d_model=48, head_dim=32)
    with pytest.raises(ValueError, match="warmup_steps"):
        train.TrainConfig(steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        train.TrainConfig.from_dict({"d_model": 64, "width": 3})


# --- zoo members: cached, trained once, stale caches detected ------------------------------------
RECIPE = train.TrainConfig(d_model=32, n_layers=1, head_dim=16, seq_len=32, batch_size=2, steps=3,
                           warmup_steps=1, eval_every=0, eval_windows=2)


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch, smollm2_tokenizer, alice_text):
    """A tmp cache, a small data directory and a tiny recipe in place of smollm2-tiny-64's."""
    from jaxens.harness import zoo

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "alice29.txt").write_text(alice_text[:12000], encoding="utf-8")
    monkeypatch.setenv("JAXENS_DATA", str(texts))
    monkeypatch.setenv("JAXENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(train.RECIPES, "smollm2-tiny-64", RECIPE)
    real = zoo.load_tokenizer
    monkeypatch.setattr(zoo, "load_tokenizer",
                        lambda name, progress=True: smollm2_tokenizer if name == "smollm2-135m" else real(name, progress=progress))
    calls = []
    orig = train.train_member

    def counting(*a, **k):
        calls.append(a[0])
        return orig(*a, **k)

    monkeypatch.setattr(train, "train_member", counting)
    return tmp_path, calls


def test_zoo_trains_once_then_loads_from_cache(tiny_zoo, capsys):
    from jaxens.harness import zoo

    tmp, calls = tiny_zoo
    assert {"smollm2-tiny-64", "smollm2-tiny-128", "smollm2-tiny-256"} <= set(zoo.known_models())
    member, tok = zoo.load("smollm2-tiny-64", progress=False)
    assert len(calls) == 1 and "trained once and cached" in capsys.readouterr().err
    path = tmp / "cache" / "zoo" / "smollm2-tiny-64" / "hf"
    meta = json.loads((path / train.META_FILE).read_text())
    assert meta["recipe"] == RECIPE.to_dict() and meta["data_hash"] == data.data_hash()
    assert meta["test_perplexity"]["alice29.txt"] > 1
    assert member.config.vocab_size == len(tok) == 49152 and member.config.d_model == 32
    # a cache hit trains nothing and gives the same weights
    again, _ = zoo.load("SMOLLM2-TINY-64", progress=False)
    assert len(calls) == 1
    np.testing.assert_array_equal(again.params_numpy()["embed"], member.params_numpy()["embed"])
    assert zoo.hf_dir("smollm2-tiny-64") == path
    with pytest.raises(ValueError, match="trained from scratch, not fetched"):
        zoo.fetch("smollm2-tiny-64")
    # the checkpoint directory is a complete HF directory: the CLI's loader reads it with AutoTokenizer
    from jaxens.harness.members import load_member

    m2, tok2 = load_member(str(path))
    assert tok2.encode("Alice was beginning") == tok.encode("Alice was beginning")


def test_zoo_retrains_a_stale_cache(tiny_zoo, monkeypatch, capsys):
    from jaxens.harness import zoo

    tmp, calls = tiny_zoo
    zoo.hf_dir("smollm2-tiny-64", progress=False)
    assert len(calls) == 1
    new = train.TrainConfig(**{**RECIPE.to_dict(), "seed": 7})
    monkeypatch.setitem(train.RECIPES, "smollm2-tiny-64", new)
    path = zoo.hf_dir("smollm2-tiny-64", progress=False)
    assert len(calls) == 2 and "different recipe" in capsys.readouterr().err
    assert train.read_meta(path)["recipe"]["seed"] == 7
    # changed texts make the cache stale too
    with (tmp / "texts" / "alice29.txt").open("a", encoding="utf-8") as f:
        f.write("One more line.\n")
    assert train.is_current(path, new) == (False, "the training texts changed since it was trained")
    zoo.hf_dir("smollm2-tiny-64", progress=False)
    assert len(calls) == 3 and train.is_current(path, new)[0]


def test_zoo_without_data_is_a_clear_error(tiny_zoo, monkeypatch):
    from jaxens.harness import zoo

    tmp, calls = tiny_zoo
    monkeypatch.setenv("JAXENS_DATA", str(tmp / "missing"))
    with pytest.raises(FileNotFoundError, match="set JAXENS_DATA"):
        zoo.load("smollm2-tiny-64", progress=False)
    assert not calls


def test_cli_train_writes_a_loadable_member(tiny_zoo, capsys):
    from jaxens.cli import main
    from jaxens.harness.members import load_member

    tmp, calls = tiny_zoo
    out = tmp / "cli-member"
    assert main(["train", "--d-model", "32", "--head-dim", "16", "--layers", "1", "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    assert "saved" in capsys.readouterr().out
    member, tok = load_member(str(out))
    assert member.config.d_model == 32 and len(tok) == 49152
    with pytest.raises(SystemExit):
        main(["train", "--steps", "2", "--out", str(tmp / "x"), "--data", str(tmp / "missing")])
    assert "set JAXENS_DATA" in capsys.readouterr().err
