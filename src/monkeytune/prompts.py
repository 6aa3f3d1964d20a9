"""Prompt templates: how a question and an image become the user turn (no torch, so the CLI
can list them cheaply).

* ``vqa``: ``<img>PATH</img> QUESTION Answer: `` (Monkey's VQA prompt);
* ``vqa-question-first``: ``QUESTION <img>PATH</img> Answer: ``, the question before the image,
  so that the visual tokens can attend to it (the layout of the embedded demo);
* ``caption``: ``<img>PATH</img> Generate the detailed caption in English: ``;
* ``chatml``: Qwen-VL-Chat's ChatML conversation; an image goes at the start of the user turn
  as ``Picture 1: <img>PATH</img>\\n`` (the Qwen-VL-Chat convention);
* ``raw``: the text exactly as given; with an image, ``<img>PATH</img>`` is put in front unless
  the text already has an image tag.
"""

from __future__ import annotations

import re

from monkeytune.tokenizer.base import split_image_tags

TEMPLATES = ("vqa", "vqa-question-first", "caption", "chatml", "tokenizer", "raw")
# The templates that keep a conversation (a system prompt, earlier exchanges); the others
# answer each question on its own.
CHAT_TEMPLATES = ("chatml", "tokenizer")
CAPTION_PROMPT = "Generate the detailed caption in English:"


def user_text(template: str, text: str, image: str | None = None) -> str:
    """The user turn for one question (and optional image) under ``template``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    tag = f"<img>{image}</img>" if image else ""
    if template == "vqa":
        return f"{tag} {text} Answer: " if tag else f"{text} Answer: "
    if template == "vqa-question-first":
        return f"{text} {tag} Answer: " if tag else f"{text} Answer: "
    if template == "caption":
        return f"{tag} {CAPTION_PROMPT} " if tag else f"{CAPTION_PROMPT} "
    if template == "chatml":
        return f"Picture 1: {tag}\n{text}" if tag else text
    if tag and not split_image_tags(text)[1]:
        return tag + text
    return text


# How each layout's user turn looks, checked in this order; ``raw`` takes everything else.
_LAYOUTS = (
    ("caption", re.compile(r"^\s*<img>[^<]*</img>\s*" + re.escape(CAPTION_PROMPT) + r"\s*$", re.DOTALL)),
    ("vqa", re.compile(r"^\s*<img>[^<]*</img>.*Answer:\s*$", re.DOTALL)),
    ("vqa-question-first", re.compile(r"^.*\S.*<img>[^<]*</img>\s*Answer:\s*$", re.DOTALL)),
)


def infer_template(user_texts: list[str], conversation_template: str = "monkey") -> str:
    """The prompt template a training set's first user turns were written in.

    ``chatml`` conversations give ``chatml``. Otherwise the layout every given text matches
    (``caption``, ``vqa`` or ``vqa-question-first``), else ``raw`` (text used as written), so
    that chat, eval and serve prompt a trained model the way its data did.
    """
    if conversation_template in CHAT_TEMPLATES:
        return conversation_template
    for name, pattern in _LAYOUTS:
        if user_texts and all(pattern.match(t) for t in user_texts):
            return name
    return "raw"


# The cue each single-turn layout ends its user turn with (see user_text).
_CUES = {"vqa": "Answer:", "vqa-question-first": "Answer:", "caption": CAPTION_PROMPT}
_LEADING_TAG = re.compile(r"^\s*<img>([^<]*)</img>(.*)$", re.DOTALL)
_TRAILING_TAG = re.compile(r"^(.*?)<img>([^<]*)</img>\s*$", re.DOTALL)


def split_complete_prompt(template: str, text: str) -> tuple[str, str | None] | None:
    """``(question, image)`` of a prompt already written out in ``template``'s layout, else None.

    A prompt that ends with the layout's cue (``Answer:`` for ``vqa`` and
    ``vqa-question-first``, the caption instruction for ``caption``) already carries the
    template's markup; rendering it again would say the cue twice. Its question and image tag
    (where the layout puts it) are taken back out, so that :func:`user_text` rebuilds exactly
    the turn training saw, spacing included. ``chatml`` and ``raw`` have no such cue: None.
    """
    cue = _CUES.get(template)
    body = text.rstrip()
    if cue is None or not body.endswith(cue):
        return None
    body = body[: -len(cue)].strip()
    if template == "vqa-question-first":
        m = _TRAILING_TAG.match(body)
        return (m.group(1).strip(), m.group(2).strip()) if m else (body, None)
    m = _LEADING_TAG.match(body)
    if template == "caption":
        # The caption turn is the tag and the instruction only; other text is not this layout.
        if not body:
            return "", None
        return ("", m.group(1).strip()) if m and not m.group(2).strip() else None
    return (m.group(2).strip(), m.group(1).strip()) if m else (body, None)
