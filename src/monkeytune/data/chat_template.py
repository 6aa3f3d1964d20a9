"""The ``tokenizer`` conversation template: a composed LLM's own Jinja chat template, with labels.

A chat template writes text, and says nothing about which of it the model should learn. So each
message's content is replaced by a marker, the template renders the conversation around the
markers, and the rendering is cut at them:

* the template's own markup (role headers, separators, BOS) is encoded with its control tokens
  recognised, and is never supervised, except
* the markup right after an assistant message up to its first control token (``<|im_end|>``,
  ``<|eot_id|>``, ``</s>`` ...): the end of a turn is what generation stops on, so it is learnt;
* each message's content is encoded as plain text with its images expanded, exactly as the
  ``monkey`` and ``chatml`` templates do (:class:`~monkeytune.data.templates.TokenBuilder`), and
  supervised for assistant messages.

Training and inference render through this one function, so a model is prompted as it was trained.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from monkeytune.data.messages import ASSISTANT, Turn

# A marker no text contains (NUL is refused in records) and no template rewrites.
_MARK = "\x00{}\x00"
_MARKS = re.compile(r"\x00(\d+)\x00")


def render_chat_template(builder: Any, system: str | None, turns: Sequence[Turn], add_generation_prompt: bool) -> Any:
    """Render ``turns`` through the tokenizer's chat template into ``builder``.

    Args:
        builder: A :class:`~monkeytune.data.templates.TokenBuilder` (its tokenizer must have
            ``render_chat`` and ``encode_markup``: a composed model's
            :class:`~monkeytune.tokenizer.pretrained.PretrainedTokenizer`).
        system: The system prompt, or None for the template's own default.
        turns: Alternating user/assistant turns.
        add_generation_prompt: End with the template's assistant header.

    Returns:
        The builder's :class:`~monkeytune.data.templates.Encoded`.

    Raises:
        ValueError: a tokenizer without a chat template, or a template that drops, repeats or
            reorders message contents (no labels could be placed).
    """
    tok = builder.tok
    if not hasattr(tok, "render_chat"):
        raise ValueError("the tokenizer template needs a tokenizer with its own chat template (a composed model's); "
                         f"{type(tok).__name__} has none: use monkey or chatml")
    messages = [{"role": "system", "content": _MARK.format(0)}] if system is not None else []
    messages += [{"role": t.role, "content": _MARK.format(i)} for i, t in enumerate(turns, start=1)]
    pieces = _MARKS.split(tok.render_chat(messages, add_generation_prompt))
    order = [int(i) for i in pieces[1::2]]
    expected = list(range(0 if system is not None else 1, len(turns) + 1))
    if order != expected:
        raise ValueError(f"the tokenizer's chat template writes the messages as {order}, not once each in order "
                         f"({expected}); it cannot be trained with labels: use monkey or chatml")
    control = set(tok.special_tokens.values())
    builder.ids(tok.encode_markup(pieces[0]), supervised=False)
    for index, markup in zip(order, pieces[2::2]):
        turn = turns[index - 1] if index else None
        learnt = turn is not None and turn.role == ASSISTANT
        builder.parts(turn.parts if turn is not None else [system], supervised=learnt)
        ids = tok.encode_markup(markup)
        end = next((k + 1 for k, i in enumerate(ids) if i in control), 0) if learnt else 0
        builder.ids(ids[:end], supervised=True)
        builder.ids(ids[end:], supervised=False)
        if learnt:
            builder.end_exchange()
    return builder.out


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The control token the chat template closes an assistant message with (``<|eot_id|>``,
    ``<|im_end|>`` ...), which generation stops on; empty for a tokenizer without a template, or
    a template that closes a message with text only."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    mark = _MARK.format(1)
    text = tokenizer.render_chat([{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}])
    if mark not in text:
        return []
    control = set(tokenizer.special_tokens.values())
    return [i for i in tokenizer.encode_markup(text.split(mark, 1)[1]) if i in control][:1]
