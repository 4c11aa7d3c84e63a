r"""Cross-tokenizer alignment: token byte strings, anchors, the union vocabulary, word boundaries.

Every token id :math:`j` of a tokenizer is mapped to the **byte string** :math:`s(j)` it stands
for in the text (its *normalised form*), which removes the tokenizer's conventions:

* byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama 3): each character of the token is one byte under
  GPT-2's ``bytes_to_unicode`` table ("Ġ" is the space byte ``0x20``, "Ċ" is ``\n``);
* SentencePiece (Gemma, Llama 2): "▁" is a space, ``<0xNN>`` byte-fallback pieces are the byte
  ``NN``, everything else is its UTF-8 encoding;
* special/control tokens (BOS, EOS, ``<unused..>``, chat markers) have no text: :math:`s(j)` is
  ``None`` and they never enter the anchors or the union.

With tokenizers :math:`T_1..T_n` and their string maps :math:`s_i`:

* **anchors**: :math:`\mathcal A = \bigcap_i s_i(V_i)` (exact normalised-string intersection),
  with one id per member for each anchor (``anchor_ids[i]``, ``int32[A]``);
* **union vocabulary**: :math:`\mathcal U = \bigcup_i s_i(V_i)` plus one ``EOS`` entry at index 0
  that every member's end-of-sequence ids map to; member :math:`i`'s sparse map to the union is
  the index array ``to_union[i]`` (``int32[v_i]``, ``-1`` for tokens without text).  The GaC
  mapping matrix :math:`M_i \in \{0,1\}^{v_i\times|\mathcal U|}` is never formed:
  :math:`p_i M_i` is a scatter-add along ``to_union[i]``;
* **first sub-token** (UniTE): ``first_sub[i][u]`` is member :math:`i`'s id of the longest prefix
  of :math:`s(u)` in its vocabulary (the token itself when :math:`s(u)\in s_i(V_i)`); every single
  byte is a token of both conventions, so it always exists;
* **word boundaries**: a token *starts a word* when its string starts with whitespace (or it is
  special); in a text, byte offset :math:`k` is a word boundary when :math:`k=0`, :math:`k=|x|`, or
  byte :math:`k` is whitespace and byte :math:`k-1` is not.

Re-encoding a piece of generated text for a member is done on the *tail* of the text that starts at
the member's last word-start token (:func:`retokenize_tail`), so a word that the sampled pieces
spell in fragments ends up tokenized the way the member itself would tokenize it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

EOS_STRING = None  # the union's index 0 is the shared end-of-sequence entry
WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def normalize_token(token: str, kind: str) -> bytes:
    """The bytes a (non-special) token string stands for, for ``kind`` in ``("byte_level", "sentencepiece", "plain")``."""
    if kind == "byte_level":
        dec = _byte_decoder()
        if all(c in dec for c in token):
            return bytes(dec[c] for c in token)
        return token.encode("utf-8")  # an added (user-defined) token written as raw text
    if kind == "sentencepiece":
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("▁", " ").encode("utf-8")
    if kind == "plain":
        return token.encode("utf-8")
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected byte_level, sentencepiece or plain")


class TokenizerView:
    """What alignment needs from a tokenizer (a ``transformers`` fast tokenizer or a raw
    ``tokenizers.Tokenizer``): the id -> string table, the special ids, and ``encode`` without
    special tokens.

    Args:
      tokenizer: the tokenizer.
      kind: ``"byte_level"``, ``"sentencepiece"`` or ``"plain"``; ``None`` detects it from the
        vocabulary (many "Ġ" tokens: byte-level; many "▁" tokens: SentencePiece).
      eos_ids: ids that end a sequence (default: the tokenizer's ``eos_token_id``).
    """

    def __init__(self, tokenizer: Any, kind: str | None = None, eos_ids: Sequence[int] | None = None):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.hf = backend is not None
        self.raw = backend if backend is not None else tokenizer
        if not hasattr(self.raw, "id_to_token"):
            raise ValueError(f"expected a transformers fast tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        n = self.raw.get_vocab_size(with_added_tokens=True)
        self.tokens = [self.raw.id_to_token(i) for i in range(n)]
        self.vocab_size = n
        added = self.raw.get_added_tokens_decoder()
        self.special = {int(i) for i, t in added.items() if t.special}
        if self.hf:
            self.special |= {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
        if eos_ids is None:
            e = getattr(tokenizer, "eos_token_id", None)
            eos_ids = [] if e is None else [int(e)]
        self.eos_ids = tuple(int(e) for e in eos_ids)
        bos = getattr(tokenizer, "bos_token_id", None) if self.hf else None
        self.bos_id = None if bos is None else int(bos)
        if kind is None:
            g = sum(1 for t in self.tokens if t and t[0] == "Ġ")
            s = sum(1 for t in self.tokens if t and t[0] == "▁")
            kind = "byte_level" if g > s and g > 0 else ("sentencepiece" if s > 0 else "plain")
            if kind == "plain" and self.hf and "ByteLevel" in repr(backend.decoder):
                kind = "byte_level"
        self.kind = kind
        strings: list[bytes | None] = []
        for i, t in enumerate(self.tokens):
            if i in self.special or t is None:
                strings.append(None)
            elif i in added and not added[i].special:
                strings.append(t.encode("utf-8"))  # user-defined pieces ("\n\n") are raw text
            else:
                strings.append(normalize_token(t, kind))
        self.strings = strings
        self.starts_word = np.array(
            [s is None or (len(s) > 0 and s[0] in WHITESPACE) for s in strings], dtype=bool
        )

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added."""
        if self.hf:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.raw.encode(text, add_special_tokens=False).ids)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt: the tokenizer's own special tokens (e.g. BOS) included; never empty."""
        ids = list(self.tokenizer.encode(text)) if self.hf else list(self.raw.encode(text).ids)
        if not ids:
            first = self.bos_id if self.bos_id is not None else (self.eos_ids[0] if self.eos_ids else None)
            if first is None:
                raise ValueError(f"prompt {text!r} encodes to no tokens and the tokenizer has no BOS/EOS")
            ids = [first]
        return ids

    def token_bytes(self, ids: Sequence[int]) -> bytes:
        """The text bytes of a token sequence (special tokens contribute nothing)."""
        return b"".join(self.strings[i] or b"" for i in ids)


def as_view(tok: Any) -> TokenizerView:
    return tok if isinstance(tok, TokenizerView) else TokenizerView(tok)


@dataclasses.dataclass(frozen=True, eq=False)
class Alignment:
    """Anchors and the union vocabulary of several tokenizers (see the module docstring).

    Attributes:
      views: one :class:`TokenizerView` per member.
      union_strings: the union's byte strings (index 0: ``None``, the shared EOS entry).
      to_union: per member, ``int32[v_i]`` union index of each token (``-1``: no text).
      anchor_ids: per member, ``int32[A]`` ids of the anchors (same anchor order for every member).
      anchor_strings: the ``A`` anchor byte strings.
      first_sub: per member, ``int32[|U|]`` the member's first sub-token of each union string
        (for index 0: the member's first EOS id, or 0).
      union_starts_word: ``bool[|U|]`` the union string starts with whitespace (EOS: True).
    """

    views: tuple[TokenizerView, ...]
    union_strings: tuple
    to_union: tuple[np.ndarray, ...]
    anchor_ids: tuple[np.ndarray, ...]
    anchor_strings: tuple[bytes, ...]
    first_sub: tuple[np.ndarray, ...]
    union_starts_word: np.ndarray

    @property
    def union_size(self) -> int:
        return len(self.union_strings)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_strings)

    def piece(self, u: int | np.integer) -> bytes | None:
        """Bytes of union entry ``u`` (``None`` for the EOS entry)."""
        return self.union_strings[int(u)]


def _longest_prefix_ids(strings: Sequence[bytes | None], table: dict[bytes, int], fallback: int) -> np.ndarray:
    out = np.full(len(strings), fallback, np.int32)
    maxlen = max((len(k) for k in table), default=1)
    for u, s in enumerate(strings):
        if s is None:
            continue
        j = table.get(s)
        if j is not None:
            out[u] = j
            continue
        for L in range(min(len(s), maxlen) - 1, 0, -1):
            j = table.get(s[:L])
            if j is not None:
                out[u] = j
                break
    return out


def align(tokenizers: Sequence[Any], *, max_anchors: int | None = None, kinds: Sequence[str | None] | None = None) -> Alignment:
    """Build the :class:`Alignment` of ``tokenizers`` (fast tokenizers, ``tokenizers.Tokenizer`` or views).

    ``max_anchors`` keeps the first anchors in the union order (the first member's id order), as
    the DeePEn configs cap the anchor count.  Raises ``ValueError`` when there are fewer than two
    tokenizers or they share no anchor.
    """
    if len(tokenizers) < 2:
        raise ValueError(f"align needs at least two tokenizers, got {len(tokenizers)}")
    kinds = [None] * len(tokenizers) if kinds is None else list(kinds)
    views = tuple(t if isinstance(t, TokenizerView) else TokenizerView(t, k) for t, k in zip(tokenizers, kinds))
    index: dict[bytes, int] = {}
    union: list = [EOS_STRING]
    tables = []
    for v in views:
        table: dict[bytes, int] = {}
        for j, s in enumerate(v.strings):
            if s is None or len(s) == 0:
                continue
            table.setdefault(s, j)  # duplicated strings: the first id is the canonical one
            if s not in index:
                index[s] = len(union)
                union.append(s)
        tables.append(table)
    to_union = []
    for v in views:
        m = np.array([-1 if (s is None or len(s) == 0) else index[s] for s in v.strings], np.int32)
        for e in v.eos_ids:
            if 0 <= e < len(m):
                m[e] = 0
        to_union.append(m)
    common = set(tables[0])
    for t in tables[1:]:
        common &= set(t)
    if not common:
        raise ValueError(
            "the tokenizers share no anchor token (no normalised token string is in every vocabulary: "
            f"kinds {[v.kind for v in views]}); cross-vocabulary ensembling needs a common alphabet"
        )
    anchors = sorted(common, key=lambda s: index[s])
    if max_anchors is not None:
        anchors = anchors[: int(max_anchors)]
    anchor_ids = tuple(np.array([t[s] for s in anchors], np.int32) for t in tables)
    first_sub = []
    for v, t in zip(views, tables):
        fs = _longest_prefix_ids(union, t, 0)
        fs[0] = v.eos_ids[0] if v.eos_ids else 0
        first_sub.append(fs)
    starts = np.array([True] + [s[0] in WHITESPACE for s in union[1:]], bool)
    return Alignment(views, tuple(union), tuple(to_union), anchor_ids, tuple(anchors), tuple(first_sub), starts)


# ---------------------------------------------------------------- text boundaries and re-encoding


def word_boundaries(text: bytes) -> np.ndarray:
    """Byte offsets ``k`` that are word boundaries of ``text`` (see the module docstring)."""
    ks = [0]
    for k in range(1, len(text)):
        if text[k] in WHITESPACE and text[k - 1] not in WHITESPACE:
            ks.append(k)
    if len(text) > 0:
        ks.append(len(text))
    return np.array(sorted(set(ks)), np.int64)


def token_offsets(view: TokenizerView, ids: Sequence[int]) -> np.ndarray:
    """Byte offset of the start of each token, plus the end: ``int64[len(ids) + 1]``."""
    lens = [len(view.strings[i] or b"") for i in ids]
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def common_boundaries(views: Sequence[TokenizerView], ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Byte offsets that are token boundaries in every member's tokenization of the same text."""
    sets = [set(token_offsets(v, i).tolist()) for v, i in zip(views, ids)]
    out = sets[0]
    for s in sets[1:]:
        out &= s
    return np.array(sorted(out), np.int64)


def valid_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that is complete UTF-8 (a token may end mid-character)."""
    for cut in range(len(data), max(len(data) - 4, -1), -1):
        try:
            data[:cut].decode("utf-8")
            return cut
        except UnicodeDecodeError:
            continue
    return 0


def retokenize_tail(view: TokenizerView, ids: Sequence[int], text: bytes, protect: int) -> tuple[int, list[int]]:
    """Re-encode the tail of ``text`` for a member whose current tokens ``ids`` spell a prefix of it.

    The tail starts at the member's last word-start token at index ``>= protect`` (the prompt is
    never re-encoded); returns ``(keep, new)``: keep ``ids[:keep]`` and append ``new`` so that the
    tokens spell the longest complete-UTF-8 prefix of ``text``.
    """
    offs = token_offsets(view, ids)
    start = len(ids)
    for k in range(len(ids) - 1, protect - 1, -1):
        start = k
        if view.starts_word[ids[k]]:
            break
    start = max(start, protect)
    end = valid_utf8_prefix(text)
    b0 = int(offs[start])
    if end < b0:  # can only happen if ids spell more than text (a caller bug)
        raise ValueError("member tokens spell more text than the row holds")
    tail = view.encode(text[b0:end].decode("utf-8")) if end > b0 else []
    old = list(ids[start:])
    c = 0
    while c < min(len(old), len(tail)) and old[c] == tail[c]:
        c += 1
    return start + c, tail[c:]
