"""jaxens.vocab.align on hand-built tokenizers with known alignments (tests/vocab_toys.py)."""

from __future__ import annotations

import numpy as np
import pytest
from vocab_toys import byte_bpe, digits_only, letters_only, sp_bpe

from jaxens.vocab.align import (
    TokenizerView,
    align,
    common_boundaries,
    normalize_token,
    retokenize_tail,
    token_offsets,
    valid_utf8_prefix,
    word_boundaries,
)

TEXT = " the cat unbelievably dog, the dog é"


@pytest.fixture(scope="module")
def views():
    return TokenizerView(byte_bpe(), eos_ids=[0]), TokenizerView(sp_bpe(), eos_ids=[1])


def _decoded_strings(tk):
    """Independent normalisation: decode each single id with the tokenizer's own decoder."""
    out = {}
    for i in range(tk.get_vocab_size()):
        t = tk.id_to_token(i)
        if t.startswith("<") and t.endswith(">") and not t.startswith("<0x"):
            continue  # specials
        if t.startswith("<0x"):
            out[i] = bytes([int(t[3:5], 16)])
        else:
            out[i] = tk.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass")
    return out


def test_normalize_conventions():
    assert normalize_token("Ġthe", "byte_level") == b" the"
    assert normalize_token("Ċ", "byte_level") == b"\n"
    assert normalize_token("Ã©", "byte_level") == "é".encode()
    assert normalize_token("▁the", "sentencepiece") == b" the"
    assert normalize_token("<0x0A>", "sentencepiece") == b"\n"
    assert normalize_token("▁▁", "sentencepiece") == b"  "


def test_kinds_and_specials(views):
    va, vb = views
    assert va.kind == "byte_level" and vb.kind == "sentencepiece"
    assert va.strings[0] is None and all(vb.strings[i] is None for i in range(4))


def test_anchor_set_is_exact_intersection(views):
    va, vb = views
    al = align(views)
    da, db = _decoded_strings(byte_bpe()), _decoded_strings(sp_bpe())
    # ASCII strings: both decoders agree with the normalisation
    sa = {s for s in da.values() if s.isascii()}
    sb = {s for s in db.values() if s.isascii()}
    anchors = set(al.anchor_strings)
    assert {s for s in anchors if s.isascii()} == sa & sb
    for s in (b" the", b" cat", b"ably", b"a", b" "):
        assert s in anchors
    for s in (b" dog", b" unbeliev"):  # only in the SentencePiece vocabulary
        assert s not in anchors and s in al.union_strings
    for i, v in enumerate(al.views):
        assert [v.strings[j] for j in al.anchor_ids[i]] == list(al.anchor_strings)
    # every single byte is a token of both conventions -> all 256 bytes are anchors
    assert all(bytes([b]) in anchors for b in range(256))


def test_union_sparse_map(views):
    al = align(views)
    assert len(set(al.union_strings[1:])) == al.union_size - 1
    for v, m in zip(al.views, al.to_union):
        assert m.dtype == np.int32 and m.shape == (v.vocab_size,)
        for j, s in enumerate(v.strings):
            if j in v.eos_ids:
                assert m[j] == 0
            elif s is None:
                assert m[j] == -1
            else:
                assert al.union_strings[m[j]] == s
    expected = {s for v in al.views for s in v.strings if s}
    assert set(al.union_strings[1:]) == expected


def test_first_sub_token(views):
    al = align(views)
    va, vb = al.views
    u = al.union_strings.index(b" unbeliev")
    # byte-level vocab lacks " unbeliev": its longest prefix is " un"
    assert va.strings[al.first_sub[0][u]] == b" un"
    assert vb.strings[al.first_sub[1][u]] == b" unbeliev"


def test_word_splits_differently(views):
    va, vb = views
    ia, ib = va.encode(TEXT), vb.encode(TEXT)
    assert va.token_bytes(ia) == TEXT.encode() == vb.token_bytes(ib)
    wa = [va.strings[i] for i in ia]
    wb = [vb.strings[i] for i in ib]
    assert wa[2:5] == [b" un", b"believ", b"ably"]
    assert wb[2:4] == [b" unbeliev", b"ably"]
    cb = common_boundaries([va, vb], [ia, ib])
    wbnd = word_boundaries(TEXT.encode())
    # inside " unbelievably" only the boundary before "ably" is shared
    start = TEXT.encode().index(b" unbel")
    inside = [k for k in cb if start < k < start + len(" unbelievably")]
    assert inside == [start + len(" unbeliev")]
    assert set(wbnd[:-1]).issubset(set(cb))  # every word start is a boundary of both
    assert list(token_offsets(va, ia))[-1] == len(TEXT.encode())


def test_word_boundaries():
    assert word_boundaries(b" a bc\n\nd").tolist() == [0, 2, 5, 8]
    assert word_boundaries(b"").tolist() == [0]


@pytest.mark.parametrize("which", [0, 1])
def test_retokenize_tail_matches_full_encoding(views, which):
    v = views[which]
    text = TEXT.encode()
    ids: list[int] = []
    rng = np.random.default_rng(which)
    k = 0
    while k < len(text):  # grow the text by random pieces (1-4 bytes), re-encoding the tail each time
        k = min(len(text), k + int(rng.integers(1, 5)))
        keep, new = retokenize_tail(v, ids, text[:k], 0)
        ids = ids[:keep] + new
        cut = valid_utf8_prefix(text[:k])
        assert v.token_bytes(ids) == text[:cut]
    assert ids == v.encode(TEXT)


def test_no_common_anchor_is_an_error():
    with pytest.raises(ValueError, match="no anchor"):
        align([TokenizerView(digits_only(), kind="plain"), TokenizerView(letters_only(), kind="plain")])
    with pytest.raises(ValueError, match="at least two"):
        align([byte_bpe()])
