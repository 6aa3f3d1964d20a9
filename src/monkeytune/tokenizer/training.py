"""Training a :class:`~monkeytune.tokenizer.simple.SimpleTokenizer` on a task's own data
(``monkeytune tokenizer train``).

The text comes from the same readers training uses (:func:`monkeytune.data.reading.load_samples`,
every format of docs/data.md): each sample's system prompt and the text of its user and
assistant turns, image references left out. With the ``chatml`` conversation template the
role headers and the default system prompt are added once per sample too, since the model
reads them on every sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from monkeytune.tokenizer.simple import MARKER_FILE, TOKENIZER_FILE, SimpleTokenizer


@dataclass
class TokenizerReport:
    """What :func:`train_tokenizer` did.

    Attributes:
        out_dir: The folder the tokenizer was written to.
        vocab_size: Ids in the trained vocabulary (specials included; may be below the size
            asked for when the data has fewer distinct merges).
        samples: Samples read.
        characters: Characters of training text.
        tokens: Tokens the trained tokenizer encodes that text into.
    """

    out_dir: Path
    vocab_size: int
    samples: int
    characters: int
    tokens: int

    def summary(self) -> str:
        per = self.characters / max(self.tokens, 1)
        return (f"trained a {self.vocab_size}-token vocabulary on {self.samples} samples "
                f"({self.characters} characters, {per:.2f} characters per token); written to {self.out_dir}")


def data_texts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    format: str = "auto",
    template: str = "monkey",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
) -> tuple[list[str], int]:
    """The text of every sample of the data files, as :func:`train_tokenizer` trains on it.

    Returns:
        ``(texts, samples)``: text pieces and the number of samples read.

    Raises:
        DataError: the first bad record (file, line and field named).
        ValueError: an unknown ``format`` or ``template``.
    """
    from monkeytune.data.reading import load_samples
    from monkeytune.data.templates import CONVERSATION_TEMPLATES, DEFAULT_SYSTEM

    if template not in CONVERSATION_TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; choose one of {', '.join(CONVERSATION_TEMPLATES)}")
    samples = load_samples(paths, format=format, image_root=image_root, allow_empty_answers=allow_empty_answers)
    texts: list[str] = []
    for sample in samples:
        if template == "chatml":
            texts.append(f"system\n{sample.system if sample.system is not None else DEFAULT_SYSTEM}")
            texts.extend(f"{turn.role}\n{turn.plain_text}" for turn in sample.turns)
        else:
            if sample.system:
                texts.append(sample.system)
            texts.extend(turn.plain_text for turn in sample.turns)
    return [t for t in texts if t.strip()], len(samples)


def train_tokenizer(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int,
    min_frequency: int = 2,
    format: str = "auto",
    template: str = "monkey",
    image_root: str | None = None,
    allow_empty_answers: bool = False,
    overwrite: bool = False,
) -> TokenizerReport:
    """Train a byte-level BPE tokenizer on the text of data files and save it.

    Use the folder as ``model.tokenizer`` of a ``preset``/``config`` model: its vocabulary size
    and image token ids are taken from the tokenizer when the model is built.

    Args:
        paths: Data file(s) in any supported format.
        out_dir: Folder to write ``tokenizer.json`` and its marker into.
        vocab_size: Upper bound on the vocabulary (at least 256 bytes plus the special tokens).
        min_frequency: Pairs seen fewer times than this are not merged.
        format: ``auto`` or a data format name.
        template: ``monkey`` or ``chatml``, the conversation template training will use.
        image_root: Folder relative image paths resolve against (only parsed here, not opened).
        allow_empty_answers: Accept assistant turns without text.
        overwrite: Replace a tokenizer already in ``out_dir`` (refused otherwise: a model trained
            with it would silently get a different vocabulary).

    Raises:
        DataError: a bad data record (file, line and field named).
        FileExistsError: ``out_dir`` already holds a tokenizer and ``overwrite`` is False.
        ValueError: no text, a vocabulary too small, or an unknown format/template.
    """
    out = Path(out_dir)
    if not overwrite and any((out / name).exists() for name in (TOKENIZER_FILE, MARKER_FILE)):
        raise FileExistsError(f"{out} already holds a tokenizer; choose another folder or overwrite it")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    texts, samples = data_texts(paths, format, template, image_root, allow_empty_answers)
    if not texts:
        raise ValueError("the data holds no text to train a tokenizer on")
    tokenizer = SimpleTokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    tokenizer.save(out)
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    return TokenizerReport(out, tokenizer.vocab_size, samples, sum(len(t) for t in texts), tokens)
