"""Any transformers tokenizer (Qwen2, Llama, Gemma, ...) as a monkeytune :class:`Tokenizer`.

A model composed from a transformers causal LM keeps that LM's own tokenizer, so the ids it was
trained on stay the same. :class:`PretrainedTokenizer` wraps the tokenizer ``AutoTokenizer``
loads and adds what monkeytune needs on top:

* the image tokens ``<img>``, ``</img>`` and ``<imgpad>``, which an LLM tokenizer lacks;
  :meth:`PretrainedTokenizer.add_image_tokens` appends them as special tokens with new ids at the
  end of the vocabulary (the model's embedding table must then have at least
  :attr:`~PretrainedTokenizer.vocab_size` rows);
* monkeytune's encoding rule: ``encode`` reads special-token strings in the text as plain text
  and adds no BOS/EOS; control tokens are inserted by id.

On disk it is whatever ``save_pretrained`` writes (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``), so plain ``AutoTokenizer.from_pretrained`` reads the folder too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from monkeytune.tokenizer.base import checked_ids, special_token_id

IMAGE_TOKENS: tuple[str, ...] = ("<img>", "</img>", "<imgpad>")


def read_transformers_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a local folder: no network, no remote code.

    Raises:
        FileNotFoundError: when ``directory`` is not a folder.
        ValueError: naming the folder when transformers cannot build a tokenizer from it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} does not exist or is not a folder")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises KeyError/OSError/ValueError depending on what is wrong
        raise ValueError(f"{directory}: transformers cannot load a tokenizer from it ({type(e).__name__}: {e})") from e


class PretrainedTokenizer:
    """A transformers tokenizer that meets the :class:`~monkeytune.tokenizer.base.Tokenizer` protocol.

    Control tokens are the added tokens marked special plus the named ones (``bos``, ``eos``,
    ``pad``, ``unk`` and the extra special tokens): :meth:`special_id` finds exactly these and
    ``decode(skip_special=True)`` drops them. The table is read once, at construction; add tokens
    before wrapping. ``eos_id`` is the tokenizer's ``eos_token`` (``<|im_end|>`` for Qwen2
    instruct models, ``<|endoftext|>`` for Qwen2 base models, ``</s>`` for Llama 2); ``pad_id``
    its ``pad_token``, or ``eos_id`` when it has none (padded positions are masked anyway).

    Args:
        tokenizer: A transformers tokenizer holding ``<img>``, ``</img>`` and ``<imgpad>`` as
            special tokens (see :meth:`add_image_tokens`).

    Raises:
        TypeError: when ``tokenizer`` is not a transformers tokenizer.
        ValueError: when it lacks an image token or an ``eos_token``.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        for name, idx in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
            if idx is not None:
                specials.setdefault(str(name), int(idx))
        self._specials = specials
        self._special_ids = frozenset(specials.values())
        missing = [t for t in IMAGE_TOKENS if t not in specials]
        if missing:
            raise ValueError(
                f"tokenizer has no special token {', '.join(missing)}: monkeytune needs "
                f"{', '.join(IMAGE_TOKENS)}; PretrainedTokenizer.add_image_tokens(tokenizer) appends "
                "them (then give the model's embedding table vocab_size rows)"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token: set tokenizer.eos_token before wrapping it")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = self.eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self.image_start_id, self.image_end_id, self.image_pad_id = (specials[t] for t in IMAGE_TOKENS)

    @classmethod
    def add_image_tokens(cls, tokenizer: PreTrainedTokenizerBase) -> "PretrainedTokenizer":
        """Add the image tokens that ``tokenizer`` lacks, in place, and wrap it.

        New tokens get the next free ids, after every existing one, so the LLM's ids are
        unchanged and only the embedding rows for the new ids need training. A token already in
        the vocabulary keeps its id and is marked special. Calling this twice adds nothing.
        """
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
        known = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        missing = [t for t in IMAGE_TOKENS if t not in known]
        if missing:
            # As extra special tokens (not just special added tokens) so that transformers'
            # ``all_special_ids`` and ``skip_special_tokens`` treat them as control tokens too;
            # replace=False keeps the tokenizer's own extras (Qwen2 lists <|im_start|> there).
            new = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in missing]
            tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
        return cls(tokenizer)

    @classmethod
    def from_dir(cls, directory: str | Path, add_image_tokens: bool = False) -> "PretrainedTokenizer":
        """Load a transformers tokenizer folder (local files only).

        Args:
            directory: Folder ``save_pretrained`` wrote (a monkeytune checkpoint or an LLM).
            add_image_tokens: Append missing image tokens (for an LLM's own folder) instead of
                refusing the tokenizer.

        Raises:
            FileNotFoundError: when the folder does not exist.
            ValueError: when transformers cannot read it, or image tokens are missing and
                ``add_image_tokens`` is False.
        """
        tokenizer = read_transformers_tokenizer(directory)
        try:
            return cls.add_image_tokens(tokenizer) if add_image_tokens else cls(tokenizer)
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from e

    def save(self, directory: str | Path) -> Path:
        """Write the ``save_pretrained`` files into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save_pretrained(str(directory))
        return directory

    def to_transformers(self) -> PreTrainedTokenizerBase:
        """A copy of the wrapped transformers tokenizer (its chat template and defaults intact).

        A copy, so that setting e.g. ``padding_side`` on it does not change this tokenizer.
        Like any transformers tokenizer it turns special-token strings into control tokens.
        """
        return copy.deepcopy(self._tok)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)``)."""
        return len(self._tok)

    @property
    def chat_template(self) -> Any:
        """The tokenizer's own Jinja chat template (a string, a dict of named ones, or None)."""
        return self._tok.chat_template

    @property
    def special_tokens(self) -> dict[str, int]:
        """Copy of the control-token table (name to id)."""
        return dict(self._specials)

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` as plain text: no BOS/EOS, special-token strings not parsed.

        Added tokens that are not special (e.g. Qwen2's ``<tool_call>``) are matched as the
        LLM's own tokenizer matches them: they are vocabulary, not control tokens.
        """
        # split_special_tokens per call rather than on the tokenizer: set there, it would be
        # saved to tokenizer_config.json and break apply_chat_template for plain transformers.
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_markup(self, text: str) -> list[int]:
        """Encode a chat template's own markup: its control-token strings become control tokens
        (no BOS/EOS is added beyond what the text writes)."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the tokenizer's own chat template writes it (text, not ids).

        Raises:
            ValueError: the tokenizer has no chat template, or the template refuses the messages
                (e.g. a system turn it does not take).
        """
        if not self._tok.chat_template:
            raise ValueError("the tokenizer has no chat template of its own; use data.template monkey or chatml")
        try:
            return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and kin
            raise ValueError(f"the tokenizer's chat template refused the conversation: {e}") from None

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Turn ids back into text.

        Args:
            ids: Token ids (ints, or anything ``int()`` accepts such as 0-d tensors).
            skip_special: Drop control tokens; otherwise they appear as their names.

        Raises:
            ValueError: for an id outside ``0 .. vocab_size-1`` (transformers would silently
                drop it).
        """
        clean = checked_ids(ids, self.vocab_size)
        if skip_special:
            clean = [i for i in clean if i not in self._special_ids]
        return self._tok.decode(clean, skip_special_tokens=skip_special)

    def special_id(self, token: str) -> int:
        """Id of a control token such as ``<|im_start|>``; ``KeyError`` if absent."""
        return special_token_id(self._specials, token)

    def __repr__(self) -> str:
        return f"PretrainedTokenizer({type(self._tok).__name__}, vocab_size={self.vocab_size})"
