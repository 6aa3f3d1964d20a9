"""Pick and load the right tokenizer for a checkpoint or tokenizer folder."""

from __future__ import annotations

from pathlib import Path

from monkeytune.tokenizer.base import Tokenizer
from monkeytune.tokenizer.qwen import VOCAB_FILE as QWEN_VOCAB_FILE
from monkeytune.tokenizer.qwen import QwenTokenizer
from monkeytune.tokenizer.simple import MARKER_FILE, TOKENIZER_FILE, SimpleTokenizer

# Files that mark a transformers tokenizer folder; tokenizer_config.json alone also covers
# tokenizers kept as tokenizer.model or vocab files, which transformers converts on load.
HF_TOKENIZER_FILES: tuple[str, ...] = (TOKENIZER_FILE, "tokenizer_config.json")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load the tokenizer stored in ``directory``.

    Tried in order: ``qwen.tiktoken`` (official Monkey / Qwen-VL checkpoints), the two files a
    :class:`SimpleTokenizer` writes, then a transformers tokenizer folder (``tokenizer.json`` or
    ``tokenizer_config.json`` without the monkeytune marker) as a
    :class:`~monkeytune.tokenizer.pretrained.PretrainedTokenizer`. The latter must already hold
    the image tokens: adding them here would give ids the checkpoint's embeddings lack (use
    ``PretrainedTokenizer.from_dir(folder, add_image_tokens=True)`` for an LLM's own folder).

    Args:
        directory: Checkpoint or tokenizer folder.

    Returns:
        A :class:`QwenTokenizer`, :class:`SimpleTokenizer` or ``PretrainedTokenizer``.

    Raises:
        FileNotFoundError: when the folder does not exist or holds no tokenizer that can be
            read; the message lists the files looked for.
        ValueError: when a transformers tokenizer lacks the image tokens or an eos token.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist or is not a folder")
    if (directory / QWEN_VOCAB_FILE).is_file():
        return QwenTokenizer.from_dir(directory)
    if (directory / MARKER_FILE).is_file() and (directory / TOKENIZER_FILE).is_file():
        return SimpleTokenizer.from_dir(directory)
    looked_for = (
        f"looked for {QWEN_VOCAB_FILE} (Qwen), {TOKENIZER_FILE} + {MARKER_FILE} (monkeytune simple "
        f"tokenizer) or {' / '.join(HF_TOKENIZER_FILES)} without {MARKER_FILE} (transformers tokenizer)"
    )
    reason = ""
    if not (directory / MARKER_FILE).is_file() and any((directory / f).is_file() for f in HF_TOKENIZER_FILES):
        # Imported here: transformers takes seconds to import, and most folders never need it.
        from monkeytune.tokenizer.pretrained import PretrainedTokenizer, read_transformers_tokenizer

        try:
            hf = read_transformers_tokenizer(directory)
        except ValueError as e:
            cause = e.__cause__ or e
            reason = f"; transformers could not read it ({type(cause).__name__}: {cause})"
        else:
            try:
                return PretrainedTokenizer(hf)
            except ValueError as e:
                raise ValueError(f"{directory}: {e}") from e
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise FileNotFoundError(
        f"no tokenizer found in {directory}: {looked_for}; folder holds {present or 'nothing'}{reason}"
    )
