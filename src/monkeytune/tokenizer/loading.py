"""Pick and load the right tokenizer for a checkpoint or tokenizer folder."""

from __future__ import annotations

from pathlib import Path

from monkeytune.tokenizer.base import Tokenizer
from monkeytune.tokenizer.qwen import VOCAB_FILE as QWEN_VOCAB_FILE
from monkeytune.tokenizer.qwen import QwenTokenizer
from monkeytune.tokenizer.simple import MARKER_FILE, TOKENIZER_FILE, SimpleTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer stored in ``directory``.

    ``qwen.tiktoken`` (official Monkey / Qwen-VL checkpoints) wins; otherwise the folder must
    hold the two files a :class:`SimpleTokenizer` writes.

    Args:
        directory: Checkpoint or tokenizer folder.

    Returns:
        A :class:`QwenTokenizer` or :class:`SimpleTokenizer`.

    Raises:
        FileNotFoundError: when the folder does not exist or holds no known tokenizer; the
            message lists the files looked for.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist or is not a folder")
    if (directory / QWEN_VOCAB_FILE).is_file():
        return QwenTokenizer.from_dir(directory)
    if (directory / MARKER_FILE).is_file() and (directory / TOKENIZER_FILE).is_file():
        return SimpleTokenizer.from_dir(directory)
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise FileNotFoundError(
        f"no tokenizer found in {directory}: looked for {QWEN_VOCAB_FILE} (Qwen) or "
        f"{TOKENIZER_FILE} + {MARKER_FILE} (monkeytune simple tokenizer); "
        f"folder holds {present or 'nothing'}"
    )
