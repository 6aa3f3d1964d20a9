"""monkeytune tokenizers as transformers ``PreTrainedTokenizerFast`` objects, with a ChatML chat template.

:func:`to_transformers_tokenizer` gives a tokenizer that plain transformers code loads with
``AutoTokenizer.from_pretrained`` (no monkeytune, no remote code) and that encodes plain text to
the same ids as the monkeytune tokenizer:

* :class:`~monkeytune.tokenizer.simple.SimpleTokenizer` is already a ``tokenizers`` object;
* :class:`~monkeytune.tokenizer.qwen.QwenTokenizer` (tiktoken) becomes a byte-level BPE with the
  same ranks: every token is in the vocabulary under its byte-to-unicode spelling, every way of
  splitting a token into two tokens is a merge ranked by the token, whole pre-tokenised pieces
  found in the vocabulary are taken as they are (tiktoken does the same), and the text is NFC
  normalised and split by Qwen's pattern first. The control tokens keep their ids (after the
  ranks, in the official order).

:data:`CHATML_TEMPLATE` renders exactly what monkeytune's ``chatml`` conversation template
(Qwen-VL-Chat's format) renders: the default system prompt unless the first message is a system
message, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and
``<|im_start|>assistant\\n`` as the generation prompt. Unlike monkeytune's own ``encode``, a
transformers tokenizer turns special-token strings in the text into control tokens, which is what
a chat template needs.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from transformers import PreTrainedTokenizerFast

from monkeytune.tokenizer.base import DEFAULT_SYSTEM, ENDOFTEXT, IM_END, IM_START
from monkeytune.tokenizer.pretrained import PretrainedTokenizer
from monkeytune.tokenizer.qwen import QWEN_PATTERN, QwenTokenizer
from monkeytune.tokenizer.simple import SimpleTokenizer

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '" + IM_START + "system\\n" + DEFAULT_SYSTEM + IM_END + "\\n' }}"
    "{%- endif -%}"
    "{{ '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + IM_START + "assistant\\n' }}{%- endif -%}"
)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ``ByteLevel`` pre-tokenisers use).

    Printable Latin-1 bytes stand for themselves; the others are moved to code points from 256 up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _qwen_backend(tokenizer: QwenTokenizer) -> HFTokenizer:
    """A ``tokenizers`` byte-level BPE that encodes like ``tokenizer`` (see the module docstring)."""
    ranks = tokenizer.ranks
    alphabet = _byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], spell(left), spell(right)))
    merges.sort()
    backend = HFTokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], fuse_unk=False, ignore_merges=True))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, idx in specials:
        if backend.token_to_id(name) != idx:
            raise ValueError(f"special token {name} would get id {backend.token_to_id(name)}, not {idx}")
    return backend


def to_transformers_tokenizer(tokenizer: Any, chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A transformers tokenizer equivalent to a monkeytune one.

    Args:
        tokenizer: A :class:`SimpleTokenizer` or :class:`QwenTokenizer` (a
            :class:`PretrainedTokenizer`, a composed model's, is returned as the transformers
            tokenizer it wraps, keeping its own chat template).
        chat_template: Jinja chat template (default: ChatML as monkeytune trains it); None for none.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token`` and ``pad_token`` ``<|endoftext|>`` and
        left padding (for generation); ``save_pretrained`` writes a folder ``AutoTokenizer`` reads.

    Raises:
        TypeError: a tokenizer of another kind.
    """
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.to_transformers()  # already one, with the LLM's own chat template
    if isinstance(tokenizer, SimpleTokenizer):
        backend = tokenizer.to_tokenizers()
    elif isinstance(tokenizer, QwenTokenizer):
        backend = _qwen_backend(tokenizer)
    else:
        raise TypeError(f"cannot convert a {type(tokenizer).__name__} to a transformers tokenizer")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        padding_side="left",
        chat_template=chat_template,
        model_max_length=1 << 30,
    )
    return fast
