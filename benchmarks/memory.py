"""Peak resident memory of real-size members, per phase (issue 17, item 1).

Random-weight GGUFs are written with ``gguf``'s writer (streamed, one tensor at a time; Q8_0
matrices and float32 norms/biases, as llama.cpp writes them) at three Llama/Qwen2 shapes:

* ``135m``: SmolLM2-135M (llama arch, vocab 49,152, d 576, 30 layers, tied head);
* ``0.5b``: Qwen2.5-0.5B (qwen2 arch, vocab 151,936, d 896, 24 layers, tied head, qkv bias);
* ``1.5b``: Qwen2.5-1.5B (qwen2 arch, vocab 151,936, d 1536, 28 layers, untied head, qkv bias).

Each phase runs in a fresh subprocess that reads its peak from ``/proc/self/status`` (``VmHWM``;
the peak is reset with ``/proc/self/clear_refs`` at the start of the phase, after the member is
loaded for the phases that need one):

* ``load``: :func:`jaxens.models.gguf.load_gguf` (float32 member);
* ``load_eager``: the old path for comparison (``gguf_to_hf`` + ``model_from_hf_tensors``);
* ``forward``: the first 256-token :func:`jaxens.models.forward.full_logits` (compile included);
* ``repeat``: five more 256-token forwards (RSS after each: flat when no call copies weights);
* ``repeat_nnx``: the same with the old ``nnx.jit(model, ...)`` forward, for comparison;
* ``problem``: :func:`jaxens.make_problem` with both members hard: the member's unembedding and a
  second random one (the other member of the issue's ensemble: d 1,536 beside the 0.5B, 896
  beside the 1.5B, 960 (SmolLM2-360M) beside the 135M), float32.

Prints a table, writes ``results/memory.json``.  Usage::

    nice python benchmarks/memory.py --sizes 135m 0.5b [1.5b] [--dir /tmp/jaxens_mem]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPECS = {
    "135m": dict(arch="llama", vocab=49152, d=576, layers=30, heads=9, kv=3, ff=1536, tied=True, bias=False,
                 theta=100000.0, pair_d=960),
    "0.5b": dict(arch="qwen2", vocab=151936, d=896, layers=24, heads=14, kv=2, ff=4864, tied=True, bias=True,
                 theta=1e6, pair_d=1536),
    "1.5b": dict(arch="qwen2", vocab=151936, d=1536, layers=28, heads=12, kv=2, ff=8960, tied=False, bias=True,
                 theta=1e6, pair_d=896),
}
TOKENS = 256
REPEATS = 5
GiB = 1 << 30


def gguf_tensors(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy (row-major) shapes of a spec, in llama.cpp's order."""
    d, H = s["d"], s["d"] // s["heads"]
    out = [("token_embd.weight", (s["vocab"], d))]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (d,)), (p + "attn_q.weight", (s["heads"] * H, d)),
                (p + "attn_k.weight", (s["kv"] * H, d)), (p + "attn_v.weight", (s["kv"] * H, d))]
        if s["bias"]:
            out += [(p + "attn_q.bias", (s["heads"] * H,)), (p + "attn_k.bias", (s["kv"] * H,)),
                    (p + "attn_v.bias", (s["kv"] * H,))]
        out += [(p + "attn_output.weight", (d, s["heads"] * H)), (p + "ffn_norm.weight", (d,)),
                (p + "ffn_gate.weight", (s["ff"], d)), (p + "ffn_up.weight", (s["ff"], d)),
                (p + "ffn_down.weight", (d, s["ff"]))]
    out.append(("output_norm.weight", (d,)))
    if not s["tied"]:
        out.append(("output.weight", (s["vocab"], d)))
    return out


def write_random_gguf(path: Path, s: dict, seed: int = 0) -> Path:
    """A random-weight GGUF of spec ``s``, streamed tensor by tensor (Q8_0 matrices, f32 vectors)."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    arch = s["arch"]
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in {"block_count": s["layers"], "embedding_length": s["d"], "context_length": 8192,
                 "feed_forward_length": s["ff"], "attention.head_count": s["heads"],
                 "attention.head_count_kv": s["kv"], "vocab_size": s["vocab"]}.items():
        w.add_uint32(f"{arch}.{k}", int(v))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", s["theta"])
    names = gguf_tensors(s)
    for name, shape in names:
        if len(shape) == 2:
            nbytes = int(np.prod(shape)) // 32 * 34
            w.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), nbytes, raw_dtype=q8)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in names:
        if len(shape) == 2:
            rows = []
            for r0 in range(0, shape[0], 8192):  # quantise in row blocks: bounded writer memory
                x = (0.02 * rng.standard_normal((min(8192, shape[0] - r0), shape[1]), dtype=np.float32))
                rows.append(gguf.quants.quantize(x, q8))
            w.write_tensor_data(np.concatenate(rows))
        elif name.endswith("norm.weight"):
            w.write_tensor_data((1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            w.write_tensor_data((0.02 * rng.standard_normal(shape)).astype(np.float32))
    w.close()
    return path


# ----- one phase, in its own process -----------------------------------------------------------

def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024 / GiB
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def run_phase(phase: str, path: Path, spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxens
    from jaxens.models.forward import full_logits
    from jaxens.models.gguf import gguf_to_hf, load_gguf
    from jaxens.models.loading import model_from_hf_tensors

    out: dict = {"phase": phase}
    start = _status()["VmRSS"]
    if phase in ("load", "load_eager"):
        _reset_peak()
        t0 = time.perf_counter()
        if phase == "load":
            model = load_gguf(path, progress=False)
        else:
            model = model_from_hf_tensors(*gguf_to_hf(path, progress=False))
        out["seconds"] = time.perf_counter() - t0
    else:
        model = load_gguf(path, progress=False)
    out["weight_gib"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / GiB
    toks = np.random.default_rng(0).integers(0, spec["vocab"], (1, TOKENS))
    if phase == "repeat_nnx":  # the forward jaxens used before (nnx.jit over the module)
        @nnx.jit
        def old_forward(model, tokens, positions, kv_mask):
            cache = model.init_cache(*tokens.shape)
            return model(tokens, positions, cache, jnp.zeros((), jnp.int32), kv_mask)[0]

        t = jnp.asarray(toks, jnp.int32)
        pos, mask = jnp.arange(TOKENS, dtype=jnp.int32)[None], jnp.ones((1, TOKENS), bool)
        fwd = lambda: old_forward(model, t, pos, mask)  # noqa: E731
    else:
        fwd = lambda: full_logits(model, toks)  # noqa: E731
    if phase in ("repeat", "repeat_nnx"):
        jax.block_until_ready(fwd())
    if phase in ("forward", "repeat", "repeat_nnx", "problem"):
        start = _status()["VmRSS"]
        _reset_peak()
    if phase == "forward":
        t0 = time.perf_counter()
        jax.block_until_ready(full_logits(model, toks))
        out["seconds"] = time.perf_counter() - t0
    elif phase in ("repeat", "repeat_nnx"):
        rss = []
        t0 = time.perf_counter()
        for _ in range(REPEATS):
            jax.block_until_ready(fwd())
            rss.append(round(_status()["VmRSS"], 3))
        out["seconds"] = (time.perf_counter() - t0) / REPEATS
        out["rss_after_each_gib"] = rss
    elif phase == "problem":
        W, _ = model.unembedding()
        W2 = jnp.asarray(0.02 * np.random.default_rng(1).standard_normal((spec["vocab"], spec["pair_d"]),
                                                                          dtype=np.float32))
        start = _status()["VmRSS"]
        _reset_peak()
        t0 = time.perf_counter()
        P = jaxens.make_problem([W, W2], hard="all")
        jax.block_until_ready(P.Q)
        out["seconds"] = time.perf_counter() - t0
        out["problem_gib"] = (P.A.nbytes + P.Q.nbytes) / GiB
        out["D"] = int(P.A.shape[1])
    st = _status()
    out.update(start_gib=start, peak_gib=st["VmHWM"], end_gib=st["VmRSS"])
    return out


# ----- driver -----------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["135m", "0.5b"], choices=sorted(SPECS))
    ap.add_argument("--phases", nargs="+", default=["load", "load_eager", "forward", "repeat", "problem"])
    ap.add_argument("--dir", default="/tmp/jaxens_mem", help="where the random GGUFs are written (kept)")
    ap.add_argument("--out", default="results/memory.json")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.dir)
    if args.phase:  # child
        print("RESULT " + json.dumps(run_phase(args.phase, root / f"{args.size}.gguf", SPECS[args.size])), flush=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    outp = Path(args.out)
    rows = []  # rows of an earlier run for other (size, phase) pairs are kept in the JSON
    old = json.loads(outp.read_text())["rows"] if outp.is_file() else []
    keep = [r for r in old if (r["size"], r["phase"]) not in {(s, p) for s in args.sizes for p in args.phases}]
    for size in args.sizes:
        path = root / f"{size}.gguf"
        if not path.is_file():
            t0 = time.perf_counter()
            print(f"writing {path} ...", flush=True)
            sub = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                  f"import memory; from pathlib import Path; "
                                  f"memory.write_random_gguf(Path({str(path)!r}), memory.SPECS[{size!r}])"])
            if sub.returncode:
                raise SystemExit(f"writing {path} failed")
            print(f"  {path.stat().st_size / GiB:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        for phase in args.phases:
            cmd = [sys.executable, __file__, "--phase", phase, "--size", size, "--dir", str(root)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not res:
                row = {"size": size, "phase": phase, "error": (p.stderr or p.stdout)[-400:]}
            else:
                row = {"size": size, **json.loads(res[-1][7:])}
            rows.append(row)
            print(_fmt(row), flush=True)
            _write(outp, keep + rows)
    print("\n" + table(sorted(keep + rows, key=_order)))


def _order(r: dict):
    phases = ["load", "load_eager", "forward", "repeat", "repeat_nnx", "problem"]
    return (list(SPECS).index(r["size"]), phases.index(r["phase"]) if r["phase"] in phases else 99)


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['size']:>5} {r['phase']:<10} FAILED: {r['error']}"
    extra = f" D={r['D']} A+Q={r['problem_gib']:.2f}" if "D" in r else ""
    extra += f" rss={r['rss_after_each_gib']}" if "rss_after_each_gib" in r else ""
    return (f"{r['size']:>5} {r['phase']:<10} weights {r['weight_gib']:.2f} GiB  start {r['start_gib']:.2f}  "
            f"peak {r['peak_gib']:.2f}  end {r['end_gib']:.2f}  {r['seconds']:.1f} s{extra}")


def table(rows: list[dict]) -> str:
    head = ("| size | phase | weights GiB | RSS at start GiB | peak RSS GiB | peak − start GiB | end GiB | s | notes |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['phase']} | failed | | | | | | |")
            continue
        d = r["peak_gib"] - r["start_gib"]
        if r["phase"].startswith("load"):
            note = f"peak − start = {d / r['weight_gib']:.2f}x weights"
        elif "D" in r:
            note = f"D = {r['D']}, A + Q = {r['problem_gib']:.2f} GiB"
        elif "rss_after_each_gib" in r:
            note = "RSS after each: " + ", ".join(f"{x:.2f}" for x in r["rss_after_each_gib"])
        else:
            note = ""
        lines.append(f"| {r['size']} | {r['phase']} | {r['weight_gib']:.2f} | {r['start_gib']:.2f} | {r['peak_gib']:.2f} "
                     f"| {d:.2f} | {r['end_gib']:.2f} | {r['seconds']:.1f} | {note} |")
    return "\n".join(lines)


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
                       f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB RAM",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
            "tokens": TOKENS, "repeats": REPEATS}
    path.write_text(json.dumps({"meta": meta, "rows": sorted(rows, key=_order)}, indent=2))


if __name__ == "__main__":
    main()
