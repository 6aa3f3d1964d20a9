"""The Qwen byte-level BPE tokenizer used by Monkey and Qwen-VL checkpoints, built on tiktoken.

A checkpoint ships its vocabulary as ``qwen.tiktoken``: one ``<base64 bytes> <rank>`` pair per
line, ranks ``0 .. n-1``. Merges follow rank order (tiktoken's BPE), text is first split with
Qwen's pre-tokenisation regex, and the control tokens get the ids right after the ranks, in the
order the official checkpoints were trained with::

    <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|> .. <|extra_204|>,
    <ref>, </ref>, <box>, </box>, <quad>, </quad>, <img>, </img>, <imgpad>

With the real 151,643-rank vocabulary that puts ``<|endoftext|>`` at 151643, ``<img>`` at 151857,
``</img>`` at 151858 and ``<imgpad>`` at 151859 (``visual.image_start_id`` in the official
config is 151857). The model's embedding table is larger (151,936 rows); the extra rows are
never produced by this tokenizer.

No remote code is run: the official tokenizer is a ``transformers`` class shipped with the
checkpoint; this module reproduces its encoding (NFC normalisation, then tiktoken) for plain text.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

from monkeytune.tokenizer.base import ENDOFTEXT, IM_END, IM_START, checked_ids, special_token_id  # noqa: F401 - also imported from here

VOCAB_FILE = "qwen.tiktoken"

# Qwen's pre-tokeniser: case-insensitive English contractions, letter runs (with at most one
# leading non-letter/digit), single digits (numbers are always split digit by digit),
# punctuation runs, newline runs, and whitespace runs that leave the last space to the next word.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_EXTRA = 205
VISION_SPECIALS = (
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<img>",
    "</img>",
    "<imgpad>",
)
SPECIAL_TOKENS: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END)
    + tuple(f"<|extra_{i}|>" for i in range(NUM_EXTRA))
    + VISION_SPECIALS
)


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` vocabulary file.

    Args:
        path: File with one ``<base64 token> <rank>`` pair per line (blank lines ignored).

    Returns:
        Mapping from token bytes to rank.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: on a malformed line (named by line number), a duplicate token or rank,
            ranks that are not exactly ``0 .. n-1``, or a missing single-byte token (every
            byte must be encodable on its own, otherwise unseen bytes could not be tokenized).
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            where = f"{path}:{lineno}"
            if len(parts) != 2:
                raise ValueError(f"{where}: expected '<base64 token> <rank>', got {raw[:80]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ValueError(f"{where}: token is not valid base64: {parts[0][:40]!r}") from e
            try:
                rank = int(parts[1])
            except ValueError as e:
                raise ValueError(f"{where}: rank is not an integer: {parts[1][:20]!r}") from e
            if rank < 0:
                raise ValueError(f"{where}: negative rank {rank}")
            if token in ranks:
                raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
            if rank in seen_ranks:
                raise ValueError(f"{where}: rank {rank} is used twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: vocabulary file is empty")
    if max(seen_ranks) != len(ranks) - 1:
        raise ValueError(
            f"{path}: ranks must be exactly 0..{len(ranks) - 1} (special tokens are numbered "
            f"after them) but the largest rank is {max(seen_ranks)}"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single-byte tokens are missing (first: {missing[0]:#04x}); "
            "a byte-level vocabulary needs all 256"
        )
    return ranks


def write_tiktoken_ranks(path: str | Path, tokens: Iterable[bytes]) -> Path:
    """Write a ``.tiktoken`` vocabulary, ranking ``tokens`` in the order given.

    Handy for building a small Qwen-format vocabulary (for instance the 256 single bytes plus a
    few merges) that :class:`QwenTokenizer` can load. A merged token is only ever produced when
    the pieces it is made of can themselves be reached by merges of lower rank.

    Args:
        path: Output file.
        tokens: Token byte strings; the first gets rank 0.

    Returns:
        ``path``.
    """
    path = Path(path)
    with open(path, "w", encoding="ascii") as f:
        for rank, token in enumerate(tokens):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    return path


class QwenTokenizer:
    """Qwen tokenizer over a ``qwen.tiktoken`` vocabulary.

    ``encode`` treats every string as plain text: ``"<|endoftext|>"`` or ``"<img>"`` in user
    text becomes ordinary byte-pair tokens, never the control token (control tokens are inserted
    by id, see :func:`monkeytune.tokenizer.base.encode_with_images`). For text without such
    strings the ids equal the official tokenizer's, which also NFC-normalises its input.

    ``pad_id`` is ``<|endoftext|>``, as in the official checkpoints (their
    ``special_tokens_map.json`` names it the pad token); padded positions are masked by the
    attention mask and labels, never learnt.

    Args:
        ranks: Token bytes to rank, ranks ``0 .. n-1`` (see :func:`read_tiktoken_ranks`).
    """

    def __init__(self, ranks: dict[bytes, int]):
        self._ranks = dict(ranks)
        self._num_ranks = len(self._ranks)
        self._specials = {tok: self._num_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "monkeytune-qwen",
            pat_str=QWEN_PATTERN,
            mergeable_ranks=self._ranks,
            special_tokens=self._specials,
        )
        self.eos_id = self._specials[ENDOFTEXT]
        self.pad_id = self.eos_id
        self.image_start_id = self._specials["<img>"]
        self.image_end_id = self._specials["</img>"]
        self.image_pad_id = self._specials["<imgpad>"]

    @classmethod
    def from_file(cls, path: str | Path) -> "QwenTokenizer":
        """Build from a ``.tiktoken`` vocabulary file (errors as in :func:`read_tiktoken_ranks`)."""
        return cls(read_tiktoken_ranks(path))

    @classmethod
    def from_dir(cls, directory: str | Path) -> "QwenTokenizer":
        """Build from a checkpoint folder holding ``qwen.tiktoken``.

        Raises:
            FileNotFoundError: naming the folder when it has no ``qwen.tiktoken``.
        """
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {VOCAB_FILE} in {Path(directory)} (looked for {path})")
        return cls.from_file(path)

    def save(self, directory: str | Path) -> Path:
        """Write ``qwen.tiktoken`` (rank order) into ``directory``; returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_rank = sorted(self._ranks, key=self._ranks.__getitem__)
        return write_tiktoken_ranks(directory / VOCAB_FILE, by_rank)

    @property
    def ranks(self) -> dict[bytes, int]:
        """The BPE ranks (token bytes -> id), without the control tokens."""
        return dict(self._ranks)

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can produce: ranks plus special tokens."""
        return self._num_ranks + len(self._specials)

    @property
    def num_ranks(self) -> int:
        """Number of ordinary (byte-pair) tokens; the first special id."""
        return self._num_ranks

    @property
    def special_tokens(self) -> dict[str, int]:
        """Copy of the special-token table (name to id)."""
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as plain text (special-token strings are not parsed).

        Args:
            text: Any string.

        Returns:
            Token ids, each below :attr:`num_ranks`.
        """
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: Token ids (ints, or anything ``int()`` accepts such as 0-d tensors).
            skip_special: Drop control tokens; otherwise they are written as their names.

        Returns:
            The text; byte sequences that are not valid UTF-8 (a sequence cut inside a
            character) become U+FFFD.

        Raises:
            ValueError: for an id outside ``0 .. vocab_size-1``.
        """
        clean = checked_ids(ids, self.vocab_size)
        if skip_special:
            clean = [i for i in clean if i < self._num_ranks]
        return self._enc.decode(clean, errors="replace")

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``<|im_start|>``.

        Raises:
            KeyError: when ``token`` is not one of :data:`SPECIAL_TOKENS`.
        """
        return special_token_id(self._specials, token)

    def __repr__(self) -> str:
        return f"QwenTokenizer(num_ranks={self._num_ranks}, vocab_size={self.vocab_size})"
