"""A small byte-level BPE tokenizer for the embedded demo and the tests.

Built with the Hugging Face ``tokenizers`` library and trained in well under a second on a
list of strings, so a tiny model can be trained end to end without the 151k-token Qwen vocabulary.
Being byte-level, it encodes any text (unseen characters fall back to byte tokens).

On disk it is two files in one folder:

* ``tokenizer.json``: the ``tokenizers`` serialisation (model, pre-tokeniser, decoder, specials);
* ``monkeytune_tokenizer.json``: a marker naming the format and the special tokens, so that
  :func:`monkeytune.tokenizer.loading.load_tokenizer` can tell this folder from an arbitrary
  Hugging Face tokenizer it does not know how to drive.

The special tokens take ids ``0 .. 11`` in the order of :data:`SPECIAL_TOKENS`, so
``<|endoftext|>`` is 0. As with the Qwen tokenizer, ``pad_id`` equals ``eos_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from monkeytune.tokenizer.base import checked_ids, special_token_id
from monkeytune.tokenizer.qwen import ENDOFTEXT, IM_END, IM_START, VISION_SPECIALS

TOKENIZER_FILE = "tokenizer.json"
MARKER_FILE = "monkeytune_tokenizer.json"
FORMAT_NAME = "monkeytune-simple-bpe"
FORMAT_VERSION = 1

# The same control tokens the Qwen tokenizer has (its 205 unused extras aside), so data and
# chat code can insert any of them by name whichever tokenizer is loaded.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + VISION_SPECIALS
_BYTE_ALPHABET = 256


class SimpleTokenizer:
    """Byte-level BPE tokenizer meeting the :class:`~monkeytune.tokenizer.base.Tokenizer` protocol.

    Use :meth:`train` to make one, :meth:`save` / :meth:`from_dir` to store and reload it.
    ``encode`` never turns special-token strings found in the text into control tokens.

    Args:
        hf: A ``tokenizers.Tokenizer`` whose added special tokens include ``special_tokens``.
        special_tokens: Names of the control tokens, each present in ``hf``.

    Raises:
        ValueError: when a special token is missing from ``hf``.
    """

    def __init__(self, hf: HFTokenizer, special_tokens: Sequence[str] = SPECIAL_TOKENS):
        self._hf = hf
        # The library would otherwise split user text on special-token strings and emit the
        # control ids; with this flag they are encoded like any other text. The flag is not
        # stored in tokenizer.json, hence set here on every construction.
        self._hf.encode_special_tokens = True
        self._specials: dict[str, int] = {}
        for name in special_tokens:
            idx = hf.token_to_id(name)
            if idx is None:
                raise ValueError(f"special token {name!r} is not in the tokenizer vocabulary")
            self._specials[name] = idx
        for required in (ENDOFTEXT, "<img>", "</img>", "<imgpad>"):
            if required not in self._specials:
                raise ValueError(f"special tokens must include {required!r}")
        self.eos_id = self._specials[ENDOFTEXT]
        self.pad_id = self.eos_id
        self.image_start_id = self._specials["<img>"]
        self.image_end_id = self._specials["</img>"]
        self.image_pad_id = self._specials["<imgpad>"]
        self._special_ids = frozenset(self._specials.values())

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2
    ) -> "SimpleTokenizer":
        """Train a byte-level BPE vocabulary on ``texts``.

        Args:
            texts: Training strings (captions, questions, answers ...).
            vocab_size: Upper bound on the vocabulary, specials included; at least the 256
                byte tokens plus the specials. A small corpus may yield fewer tokens.
            min_frequency: Pairs seen fewer times than this are not merged.

        Raises:
            ValueError: when ``vocab_size`` cannot hold the bytes and specials.
        """
        minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least {minimum}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # Seeding all 256 byte symbols makes every string encodable, seen or not.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, SPECIAL_TOKENS)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "SimpleTokenizer":
        """Load a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: naming the folder when a file is missing.
            ValueError: when the marker is malformed or of another format.
        """
        directory = Path(directory)
        marker_path = directory / MARKER_FILE
        tok_path = directory / TOKENIZER_FILE
        for p in (marker_path, tok_path):
            if not p.is_file():
                raise FileNotFoundError(f"no {p.name} in {directory} (looked for {p})")
        try:
            marker = json.loads(marker_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{marker_path}: not valid JSON ({e})") from e
        if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
            raise ValueError(f"{marker_path}: field 'format' must be {FORMAT_NAME!r}")
        if marker.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{marker_path}: field 'version' is {marker.get('version')!r}, "
                f"this monkeytune reads version {FORMAT_VERSION}"
            )
        names = marker.get("special_tokens")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{marker_path}: field 'special_tokens' must be a list of strings")
        try:
            hf = HFTokenizer.from_file(str(tok_path))
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise ValueError(f"{tok_path}: cannot be read as a tokenizers file ({e})") from e
        try:
            return cls(hf, names)
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from e

    def to_tokenizers(self) -> HFTokenizer:
        """A fresh copy of the ``tokenizers`` object (with the library's default special-token splitting)."""
        return HFTokenizer.from_str(self._hf.to_str())

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and the marker into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        marker = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "special_tokens": list(self._specials),
        }
        (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        return directory

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Copy of the special-token table (name to id)."""
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as plain text; special-token strings are not parsed."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: Token ids.
            skip_special: Drop control tokens; otherwise they appear as their names.

        Raises:
            ValueError: for an id outside ``0 .. vocab_size-1``.
        """
        clean = checked_ids(ids, self.vocab_size)
        if skip_special:
            clean = [i for i in clean if i not in self._special_ids]
        return self._hf.decode(clean, skip_special_tokens=False)

    def special_id(self, token: str) -> int:
        """Id of a special token such as ``<|im_start|>``; ``KeyError`` if absent."""
        return special_token_id(self._specials, token)

    def __repr__(self) -> str:
        return f"SimpleTokenizer(vocab_size={self.vocab_size})"
