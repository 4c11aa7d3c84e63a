"""The texts' train / validation / test split (deterministic, disjoint, at line boundaries) and the
loader's errors on a missing directory, an empty file and a file that is not UTF-8."""

from __future__ import annotations

import numpy as np
import pytest

from jaxens.harness import data


class CharTokenizer:
    """A stand-in tokenizer: one id per character (code point), EOS = 0."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        p = folder / name
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text, encoding="utf-8")
    return folder


def _lines_text(n_lines, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "déjà", "vu", "œuvre", "x"]
    return "".join(" ".join(rng.choice(words, rng.integers(0, 9))) + "\n" for _ in range(n_lines))


@pytest.mark.parametrize("seed", range(5))
def test_split_partitions_each_text_at_line_boundaries(seed):
    text = _lines_text(200 + 37 * seed, seed)
    parts = data.split_text(text)
    assert list(parts) == ["train", "validation", "test"]
    assert parts["train"] + parts["validation"] + parts["test"] == text  # disjoint and complete
    n = len(text)
    a, b = len(parts["train"]), len(parts["train"]) + len(parts["validation"])
    # each cut is the first line end at or after 80% / 90% of the characters
    for cut, frac in ((a, 0.8), (b, 0.9)):
        start = int(frac * n)
        assert cut > start and text[cut - 1] == "\n" and "\n" not in text[start:cut - 1]
    assert data.split_text(text) == parts  # a pure function of the text


def test_split_without_newline_cuts_at_the_fraction():
    parts = data.split_text("abcdefghij")
    assert parts == {"train": "abcdefgh", "validation": "i", "test": "j"}


def test_texts_split_every_file_and_are_deterministic(tmp_path):
    files = {"b.txt": _lines_text(300, 1), "a.txt": _lines_text(120, 2), "ignored.md": "not a text"}
    d = _write(tmp_path / "texts", files)
    for split in data.SPLITS:
        got = data.texts(split, d)
        assert list(got) == ["a.txt", "b.txt"]  # sorted by name, *.txt only
        for name, t in got.items():
            assert t == data.split_text(files[name])[split]
    assert data.texts("test", d, names=["b.txt"]) == {"b.txt": data.split_text(files["b.txt"])["test"]}
    with pytest.raises(ValueError, match="no text named"):
        data.texts("test", d, names=["c.txt"])
    with pytest.raises(ValueError, match="split"):
        data.texts("dev", d)


def test_token_stream_joins_files_with_eos(tmp_path, monkeypatch):
    files = {"a.txt": "one\ntwo\nthree\nfour\nfive\n", "b.txt": "héllo\nwörld\n" * 5}
    d = _write(tmp_path / "texts", files)
    monkeypatch.setenv("JAXENS_DATA", str(d))
    tok = CharTokenizer()
    per_file = data.tokens(tok, "train")
    assert all(v.dtype == np.int32 for v in per_file.values())
    stream = data.token_stream(tok, "train")
    want = np.concatenate([per_file["a.txt"], [0], per_file["b.txt"], [0]])
    np.testing.assert_array_equal(stream, want)
    assert "".join(map(chr, per_file["b.txt"])) == data.split_text(files["b.txt"])["train"]


def test_data_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXENS_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("JAXENS_DATA")
    assert data.data_root().parts[-2:] == ("shared", "data")


def test_data_hash_tracks_contents(tmp_path):
    d = _write(tmp_path / "texts", {"a.txt": "one\ntwo\n", "b.txt": "three\n"})
    h = data.data_hash(d)
    assert h == data.data_hash(d) and len(h) == 64
    (d / "b.txt").write_text("three!\n")
    assert data.data_hash(d) != h


def test_missing_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXENS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere not found: set JAXENS_DATA"):
        data.texts("train")
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt file"):
        data.data_hash()


def test_empty_and_non_utf8_files_are_clear_errors(tmp_path):
    d = _write(tmp_path / "empty", {"a.txt": "fine\n", "b.txt": "  \n"})
    with pytest.raises(ValueError, match=r"b\.txt is empty"):
        data.texts("train", d)
    d = _write(tmp_path / "latin1", {"a.txt": "caf\xe9\n".encode("latin-1")})
    with pytest.raises(ValueError, match=r"a\.txt is not valid UTF-8.*iconv"):
        data.texts("test", d)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        data.data_hash(d)


def test_real_texts_split(monkeypatch):
    """The real corpus (skipped when absent): every file splits into three non-empty parts."""
    root = data.data_root()
    if not root.is_dir():
        pytest.skip(f"texts not found at {root}")
    whole = data.read_all()
    assert "alice29.txt" in whole
    parts = {s: data.texts(s) for s in data.SPLITS}
    for name, text in whole.items():
        got = [parts[s][name] for s in data.SPLITS]
        assert "".join(got) == text and all(got)
        assert 0.79 < len(got[0]) / len(text) < 0.81
