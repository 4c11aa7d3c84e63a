"""The package's shape: no import cycle, the core apart from the application, small files.

These are the rules a newcomer relies on when reading the tree (issue 16): every concept has one
room, the library (``jaxens/`` minus ``harness`` and ``cli``) never imports the application, and
the public API stays small enough to read in one sitting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "jaxens"
APP = ("jaxens.harness", "jaxens.cli")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> dict[str, bool]:
    """Modules of the package that ``name`` imports, each with whether the import is top level."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    top_level = {id(n) for n in tree.body}
    for n in tree.body:  # imports guarded by `if TYPE_CHECKING:` / try blocks are still top level
        if isinstance(n, (ast.If, ast.Try)):
            top_level |= {id(m) for m in ast.walk(n)}
    out: dict[str, bool] = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in mods and t != name:
                out[t] = out.get(t, False) or id(node) in top_level
    return out


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    # function-local imports count too: a cycle hidden in a function is still a cycle
    _, edges = _graph()
    assert _cycles(edges) == []


def test_core_imports_no_application_module():
    mods, edges = _graph()
    bad = [
        (m, t)
        for m, ts in edges.items()
        if m != "jaxens" and not m.startswith(APP)
        for t in ts
        if t.startswith(APP)
    ]
    assert bad == []
    # the package root is core too
    assert [t for t in edges["jaxens"] if t.startswith(APP)] == []


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_public_api_is_small_and_documented():
    import jaxens

    assert len(jaxens.__all__) <= 30
    assert len(set(jaxens.__all__)) == len(jaxens.__all__)
    # each public name shows its math or a short example
    undocumented = [
        n for n in jaxens.__all__
        if not any(k in (getattr(jaxens, n).__doc__ or "") for k in (":math:", "math::", "::", ">>>"))
    ]
    assert undocumented == []
    for app in ("EvalConfig", "EvalResult", "TrainConfig", "train_member", "zoo"):
        assert app not in jaxens.__all__


@pytest.mark.parametrize("name", ["README.md"])
def test_readme_is_a_guide_not_a_notebook(name):
    assert len((ROOT / name).read_text().splitlines()) <= 250
