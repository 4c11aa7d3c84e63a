"""Teacher-forced bits per byte of cross-vocabulary methods (jaxens.harness.bpb) and `jaxens eval`
with cross-vocabulary members (jaxens.harness.eval_cross), on toy members with hand-built tokenizers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from toy_models import ToyConfig, ToyLM, reference_logits
from vocab_toys import byte_bpe, sp_bpe

from jaxens.harness.bpb import code_length, cross_bits_per_byte, member_bits_per_byte, split_rows
from jaxens.harness.teacher_forcing import teacher_forced_log_probs
from jaxens.vocab import SAFE, DeePEn, GaC, MECross, TokenizerView, UniTE, align
from jaxens.vocab.align import valid_utf8_prefix

TEXT = " the cat unbelievably dog, the dog é the cat. The cat sat on the dog and the dog was unbelievably calm."
LN2 = np.log(2.0)


@pytest.fixture(scope="module")
def toys():
    va, vb = TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])
    ma = ToyLM(ToyConfig(vocab_size=va.vocab_size, max_position_embeddings=512), seed=1)
    mb = ToyLM(ToyConfig(vocab_size=vb.vocab_size, max_position_embeddings=512), seed=2)
    return (va, vb), (ma, mb), align([va, vb])


def _member_bits(model, view, rows):
    return sum(member_bits_per_byte(model, view, r).bits for r in rows)


def test_split_rows_cuts_at_word_boundaries():
    rows = split_rows(TEXT, 30)
    assert "".join(rows) == TEXT and len(rows) >= 3
    assert all(r[0] == " " for r in rows)
    assert split_rows(TEXT, None) == [TEXT]


def test_ensemble_of_a_member_with_itself_is_the_member(toys):
    """One member (paired with itself): every method's teacher-forced bpb is the member's bpb.

    ASCII text: inside a multi-byte character the copy that re-encodes the text only sees the
    complete-UTF-8 prefix (as in generation), so it would differ from the forced copy there."""
    (va, _), (ma, _), _ = toys
    rows = split_rows(TEXT.replace("é", "e"), 40)
    ref = _member_bits(ma, va, rows)
    methods = {"gac": GaC(), "unite": UniTE(k=va.vocab_size), "deepen0": DeePEn(steps=0, k=32, max_anchors=64),
               "deepen": DeePEn(k=va.vocab_size, max_anchors=64), "safe": SAFE(), "me": MECross()}
    res = teacher_forced_log_probs([ma, ma], [va, va], methods, rows)
    nb = sum(res.num_bytes)
    assert nb == len(TEXT)
    for name in ["pivot", *methods]:
        cl = code_length(res.logp[name], res.logp["pivot"], nb)
        assert cl.zero == 0
        # DeePEn's AdamW search moves the logits by its weight decay only (its gradient is zero here)
        tol = 2e-3 if name == "deepen" else 1e-5
        assert abs(cl.bits - ref) <= tol * ref, (name, cl.bits, ref)
    assert res.stats["safe"].get("ensembled", 0) == 0  # identical members never disagree


def test_all_weight_on_the_pivot_is_the_pivot(toys):
    """Different tokenizers, weight (1, 0): GaC, ME, DeePEn (no search steps) and SAFE's ensemble
    (all consulted, no truncation) equal the pivot's own bpb; with pivot 1 the pivot line is member 1."""
    views, (ma, mb), al = toys
    rows = split_rows(TEXT, 40)
    w = (1.0, 0.0)
    methods = {"gac": GaC(weights=w), "me": MECross(weights=w),
               "deepen": DeePEn(weights=w, steps=0, k=32, scale=20.0, max_anchors=64),
               "safe": SAFE(weights=w, top_m=al.union_size, sharpen=False, confidence=1.0, disagreement=0.0)}
    res = teacher_forced_log_probs([ma, mb], list(views), methods, rows, alignment=al)
    ref = _member_bits(ma, views[0], rows)
    for name in ["pivot", *methods]:
        bits = code_length(res.logp[name], res.logp["pivot"], sum(res.num_bytes)).bits
        assert abs(bits - ref) <= 1e-5 * ref, (name, bits, ref)
    assert res.stats["safe"]["ensembled"] > 0  # the ensemble path was exercised
    res1 = teacher_forced_log_probs([ma, mb], list(views), {"gac": GaC(main=1)}, rows, alignment=al, pivot=1)
    ref1 = _member_bits(mb, views[1], rows)
    assert abs(-sum(x.sum() for x in res1.logp["pivot"]) / LN2 - ref1) <= 1e-5 * ref1
    with pytest.raises(ValueError, match="pivot"):
        teacher_forced_log_probs([ma, mb], list(views), {"gac": GaC(main=1)}, rows, alignment=al)


def _brute_contexts(views, rows, pivot=0):
    """Per position: (row, k, pivot context ids, other member's context ids, pivot id, its string)."""
    pv, ov = views[pivot], views[1 - pivot]
    ctx = lambda v: [v.bos_id if v.bos_id is not None else v.eos_ids[0]]  # noqa: E731
    out = []
    for r, text in enumerate(rows):
        ids = pv.encode(text)
        for k in range(len(ids)):
            prefix = pv.token_bytes(ids[:k])
            prefix = prefix[: valid_utf8_prefix(prefix)].decode("utf-8")
            other = ctx(ov) + (ov.encode(prefix) if prefix else [])
            out.append((r, k, ctx(pv) + ids[:k], other, ids[k], pv.strings[ids[k]]))
    return out


def _lp(model, ids):
    return np.asarray(jax.nn.log_softmax(reference_logits(model, ids)[-1].astype(np.float64)))


def test_gac_matches_brute_force_union_mixture(toys):
    views, (ma, mb), al = toys
    rows = split_rows(TEXT, 40)
    w = np.array([0.3, 0.7])
    res = teacher_forced_log_probs([ma, mb], list(views), {"gac": GaC(weights=tuple(w))}, rows, alignment=al)
    index = {s: u for u, s in enumerate(al.union_strings) if s is not None}
    bits = 0.0
    for r, k, c0, c1, _, s in _brute_contexts(views, rows):
        p = np.zeros(al.union_size)
        for wi, model, ctx, v in ((w[0], ma, c0, views[0]), (w[1], mb, c1, views[1])):
            q = np.exp(_lp(model, ctx))
            for j, sj in enumerate(v.strings):  # the map M_i, by hand
                if j in v.eos_ids:
                    p[0] += wi * q[j]
                elif sj:
                    p[index[sj]] += wi * q[j]
        lp = np.log(p[index[s]] / p.sum())
        assert abs(lp - res.logp["gac"][r][k]) < 1e-4, (r, k)
        bits -= lp / LN2
    got = code_length(res.logp["gac"], res.logp["pivot"], sum(res.num_bytes)).bits
    assert abs(got - bits) < 1e-5 * bits
    # the one-call API agrees
    one = cross_bits_per_byte("gac", [ma, mb], list(views), TEXT, weights=tuple(w), chunk_bytes=40, alignment=al)
    assert abs(one.bits - bits) < 1e-5 * bits and one.num_bytes == len(TEXT.encode())


def test_unite_zero_mass_counted(toys):
    """UniTE with k=1: the observed piece is often outside both members' top-1; those events are
    counted exactly, the bpb is infinite, and the smoothed figure is finite."""
    views, (ma, mb), al = toys
    rows = split_rows(TEXT, 40)
    safe = SAFE(confidence=1.0, disagreement=0.0, top_m=4)
    res = teacher_forced_log_probs([ma, mb], list(views), {"unite": UniTE(k=1), "safe": safe}, rows, alignment=al)
    index = {s: u for u, s in enumerate(al.union_strings) if s is not None}
    expected = 0
    for r, k, c0, c1, _, s in _brute_contexts(views, rows):
        cand = set()
        for i, (model, ctx) in enumerate(((ma, c0), (mb, c1))):
            cand.add(int(al.to_union[i][int(np.argmax(_lp(model, ctx)))]))
        outside = index[s] not in cand
        expected += outside
        assert np.isinf(res.logp["unite"][r][k]) == outside, (r, k)
    cl = code_length(res.logp["unite"], res.logp["pivot"], sum(res.num_bytes))
    assert expected > 0 and cl.zero == expected
    assert np.isinf(cl.bpb) and np.isfinite(cl.smoothed_bpb)
    # SAFE (top 4 of the ensemble): its zero events are split into outside-top-m and sharpened-away
    st = res.stats["safe"]
    zs = code_length(res.logp["safe"], res.logp["pivot"], sum(res.num_bytes)).zero
    assert zs > 0 and zs == st["zero_outside_top_m"] + st["zero_sharpened"] and st["ensembled"] >= zs
    # smoothing: log((1-lam) P + lam p_pivot) >= log(lam p_pivot)
    piv = -sum(x.sum() for x in res.logp["pivot"]) / LN2
    assert cl.smoothed_bits <= piv + cl.tokens * -np.log2(cl.lam) + 1e-6


def test_cli_eval_cross_vocab(toys, tmp_path, monkeypatch, capsys):
    import jaxens.cli as cli
    from jaxens.harness import members

    (va, vb), (ma, mb), _ = toys
    loaded = {"toy-byte": (ma, va), "toy-sp": (mb, vb)}
    monkeypatch.setattr(members, "load_member", lambda spec, dtype="float32": loaded[spec])
    f = tmp_path / "toy.txt"
    f.write_text((TEXT + "\n") * 30)
    g = tmp_path / "toy2.txt"
    g.write_text((" the dog and the cat.\n" + TEXT[::-1] + "\n") * 20)
    js, png = tmp_path / "out.json", tmp_path / "out.png"
    code = cli.main(["eval", "--member", "toy-byte", "--member", "toy-sp", "--text", str(f), "--text", str(g),
                     "--max-bytes", "150", "--chunk-bytes", "50", "--vocab-option", "unite.k=2",
                     "--vocab-option", "deepen.max_anchors=64", "--json", str(js), "--plot", str(png),
                     "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("toy-byte (pivot)", "toy-sp", "gac", "unite", "deepen", "safe", "me", "word-mixture"):
        assert f"| {name} |" in out
    data = json.loads(js.read_text())
    rows = {r["combiner"]: r for r in data["rows"]}
    assert set(rows["gac"]["per_text"]) == {"toy.txt", "toy2.txt"}
    assert rows["unite"]["options"]["k"] == 2
    m = data["meta"]["pivot_check_bits"]
    assert abs(m["decode_loop"] - m["member"]) < 1e-4 * m["member"]
    for r in data["rows"]:
        assert r["bytes"] == data["meta"]["bytes"] and 0 < r["bytes"] <= 300
    try:
        import matplotlib  # noqa: F401

        assert png.stat().st_size > 0
    except ImportError:
        pass
