"""Prompting and generation for chat, scoring and evaluation.

Prompt templates are named and worded in :mod:`monkeytune.prompts`. ``vqa``,
``vqa-question-first``, ``caption`` and ``raw`` prompts are rendered with the ``monkey``
conversation template of :mod:`monkeytune.data.templates` and ``chatml`` with its ``chatml``
template, so inference sees exactly what training produced. Generation stops at
``<|endoftext|>`` (and, for ChatML, at ``<|im_end|>`` / ``<|im_start|>``).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from monkeytune.data.chat_template import turn_end_ids
from monkeytune.data.templates import build_prompt
from monkeytune.limits import Deadline, GenerationTimeout, check_prompt_length, check_raw_length
from monkeytune.prompts import CHAT_TEMPLATES, TEMPLATES, split_complete_prompt, user_text
from monkeytune.streaming import TokenStreamer
from monkeytune.vision.processor import ImageProcessor

logger = logging.getLogger(__name__)


FALLBACK_TEMPLATE = "vqa"
_told: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models whose template was logged already (once each)


def default_template(model: Any, where: str = "the model folder") -> str:
    """The prompt template a model was trained with, as its folder records it.

    ``prompt_template`` in the folder's metadata (``monkeytune train`` writes it, from the layout
    of the training data's questions), else ``chatml`` for chat checkpoints (``chat_format:
    chatml``). A folder that records neither (an official Monkey folder, one written by an older
    version) gets :data:`FALLBACK_TEMPLATE` (Monkey's VQA layout) with a logged warning, since
    answers then rest on a guess. The choice is logged once per loaded model.

    Args:
        model: A loaded model (its ``metadata``) or a folder's metadata dict itself.
        where: How the log names the folder.
    """
    meta = model if isinstance(model, dict) else (getattr(model, "metadata", {}) or {})
    first = isinstance(model, dict) or model not in _told
    if not isinstance(model, dict):
        _told.add(model)
    recorded = meta.get("prompt_template")
    if recorded in TEMPLATES:
        if first:
            logger.info("prompt template %s, as %s records", recorded, where)
        return recorded
    if meta.get("chat_format") in CHAT_TEMPLATES:
        if first:
            logger.info("prompt template %s: %s records a chat checkpoint", meta["chat_format"], where)
        return meta["chat_format"]
    if first:
        why = f"records an unknown prompt template {recorded!r}" if recorded else "records no prompt template"
        logger.warning("%s %s: prompting with the %s layout; choose another with --prompt-template (or template=...)",
                       where, why, FALLBACK_TEMPLATE)
    return FALLBACK_TEMPLATE


def prompt_ids(
    template: str,
    tokenizer: Any,
    tokens_per_image: int,
    text: str,
    image: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
    config: Any = None,
    max_new_tokens: int = 0,
) -> tuple[list[int], list[str]]:
    """Token ids of a generation prompt and the image paths it names.

    Args:
        template: One of :data:`TEMPLATES`.
        tokenizer: Any monkeytune tokenizer.
        tokens_per_image: ``model.config.tokens_per_image``.
        text: The question (or the raw text).
        image: Optional image path, placed as the template says.
        history: Earlier ``(user_text, answer)`` exchanges (already rendered user texts), for
            multi-turn ChatML.
        system: ChatML system prompt (default: the template's).
        config: The model's ``ModelConfig``: when given, a prompt that cannot fit before
            ``max_new_tokens`` new tokens is refused, from its raw length first (see
            :mod:`monkeytune.limits`).
        max_new_tokens: Tokens to be generated after the prompt.

    Returns:
        ``(ids, image_paths)``.

    Raises:
        PromptTooLongError: with ``config``, a prompt longer than the model can take.
    """
    if config is not None:
        texts = [text, system or "", *(t for pair in history for t in pair)]
        check_raw_length(texts, tokenizer, config, max_new_tokens)
    turns: list[dict[str, str]] = []
    if system is not None and template in CHAT_TEMPLATES:
        turns.append({"role": "system", "content": system})
    for user, answer in history:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    turns.append({"role": "user", "content": user_text(template, text, image)})
    kind = template if template in CHAT_TEMPLATES else "monkey"
    ids, images = build_prompt(kind, turns, tokenizer, tokens_per_image, add_generation_prompt=True)
    if config is not None:
        check_prompt_length(len(ids), config, max_new_tokens)
    return ids, images


def stop_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end an answer."""
    ids = [tokenizer.eos_id]
    if template == "tokenizer":
        ids += [i for i in turn_end_ids(tokenizer) if i not in ids]
    if template == "chatml":
        for name in ("<|im_end|>", "<|im_start|>"):
            try:
                ids.append(tokenizer.special_id(name))
            except KeyError:
                pass
    return ids


def prompt_image_path(path: str, root: str | Path | None) -> str:
    """An image path as written in a prompt, resolved against ``root`` unless absolute (records
    resolve theirs by :func:`monkeytune.data.views.resolve_image`: URLs, data URIs, table cells)."""
    p = Path(path).expanduser()
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    return str(p)


def load_views(
    model: Any, image_paths: Sequence[str], root: str | Path | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(pixel_values [N, 3, S, S], view_slots [N])`` of images in order (None, None when there are none)."""
    if not image_paths:
        return None, None
    processor = ImageProcessor(model.config.image)
    views, slots = processor.batch([prompt_image_path(p, root) for p in image_paths])
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    return views.to(device=device, dtype=dtype), slots.to(device)


@dataclass
class GenerationSettings:
    """Decoding settings; ``temperature == 0`` means greedy.

    ``time_limit_s`` ends a generation at the next token after that many seconds
    (:class:`~monkeytune.limits.GenerationTimeout`); None: no limit.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    time_limit_s: float | None = None

    def kwargs(self) -> dict[str, Any]:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError(f"the time limit must be above 0 seconds, got {self.time_limit_s}")
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, **self.extra}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kw.update(do_sample=False)
        return kw


def cut_at_stop(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The ids up to (not including) the first stop id."""
    out = []
    for t in ids:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


class OnlyTokenizerIds(LogitsProcessor):
    """Never pick an id past the tokenizer's vocabulary.

    Embedding tables are often larger than their tokenizer (rounded up for speed: Qwen's 151936
    rows for 151851 tokens); a row no token maps to has no text, and an undertrained model may
    still rank it first.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Args: scores ``[B, V]``. Returns them with ids ``>= vocab_size`` at -inf."""
        scores[:, self.vocab_size :] = float("-inf")
        return scores


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[tuple[list[int], list[str]]],
    settings: GenerationSettings,
    stops: Sequence[int],
    image_root: str | Path | None = None,
    streamer: TokenStreamer | None = None,
) -> list[list[int]]:
    """Generate for a batch of prompts (left-padded), returning each answer's ids without stop tokens.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM`.
        tokenizer: Its tokenizer (``pad_id`` pads).
        prompts: ``(ids, image_paths)`` per row, as :func:`prompt_ids` returns.
        settings: Decoding settings.
        stops: Stop ids (see :func:`stop_ids`).
        image_root: Folder relative image paths are resolved against.
        streamer: Optional :class:`TokenStreamer` (batch of one only).

    Raises:
        PromptTooLongError: a prompt longer than the model can take with ``max_new_tokens``.
        GenerationTimeout: ``settings.time_limit_s`` ran out (the answers so far attached).
    """
    for ids, _ in prompts:
        check_prompt_length(len(ids), model.config, settings.max_new_tokens)
    kwargs = settings.kwargs()
    deadline = Deadline(settings.time_limit_s) if settings.time_limit_s else None
    if deadline is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), deadline])
    if model.config.llm.vocab_size > tokenizer.vocab_size:
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []),
                                                          OnlyTokenizerIds(tokenizer.vocab_size)])
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    paths: list[str] = []
    for row, (ids, images) in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
        paths.extend(images)
    pixel_values, slots = load_views(model, paths, image_root)
    out = model.generate(
        input_ids.to(device),
        attention_mask=mask.to(device),
        pixel_values=pixel_values,
        view_slots=slots,
        eos_token_id=list(stops),
        pad_token_id=tokenizer.pad_id,
        streamer=streamer,
        **kwargs,
    )
    answers = [cut_at_stop(row.tolist(), stops) for row in out]
    if deadline is not None and deadline.expired:
        raise GenerationTimeout(
            f"the answer was stopped after {deadline.seconds:g} s, the time limit per request", partial=answers)
    return answers


def answer(
    model: Any,
    tokenizer: Any,
    text: str,
    image: str | None = None,
    template: str | None = None,
    history: Sequence[tuple[str, str]] = (),
    settings: GenerationSettings | None = None,
    stream: TextIO | Callable[[str], Any] | None = None,
) -> str:
    """Answer one prompt (optionally streaming the text as it is generated).

    Returns:
        The answer text, stripped.
    """
    template = template or default_template(model)
    settings = settings or GenerationSettings()
    ids, images = prompt_ids(template, tokenizer, model.config.tokens_per_image, text, image, history,
                             config=model.config, max_new_tokens=settings.max_new_tokens)
    streamer = TokenStreamer(tokenizer, stream) if stream is not None else None
    new = generate_ids(model, tokenizer, [(ids, images)], settings, stop_ids(tokenizer, template), streamer=streamer)
    return tokenizer.decode(new[0]).strip()


@torch.no_grad()
def score_answer(
    model: Any,
    tokenizer: Any,
    prompt: str,
    answer_text: str,
    image: str | None = None,
    template: str | None = None,
) -> dict[str, Any]:
    """Log-probability of each answer token given the prompt.

    The prompt (rendered by ``template``, by default the one the model folder records, see
    :func:`default_template`; ``raw`` takes a prompt written out in full) and the answer are
    tokenised separately and concatenated, as in training. A prompt that already ends with the
    template's cue (``"<img>a.png</img> What is it? Answer: "`` under ``vqa``) is taken as the
    complete user turn (see :func:`split_complete_prompt`): it scores exactly as the question
    with ``image="a.png"`` does, rather than saying ``Answer:`` twice.

    Returns:
        ``{"tokens": [{"id", "text", "logprob"}...], "sum_logprob", "mean_nll", "num_tokens"}``.

    Raises:
        ValueError: an empty answer or prompt, or a complete prompt naming an image when
            ``image`` names one too.
    """
    # Prompt and answer share the model's positions: both count against its length.
    template = template or default_template(model)
    complete = split_complete_prompt(template, prompt)
    if complete is not None:
        prompt, tagged = complete
        if tagged and image:
            raise ValueError(f"the prompt already names its image (<img>{tagged}</img>); give the image there or "
                             "with --image, not both")
        image = tagged or image
        logger.info("the prompt already ends the %s way: scored as the complete user turn", template)
    check_raw_length([prompt, answer_text], tokenizer, model.config, what="the prompt with its answer")
    ids, images = prompt_ids(template, tokenizer, model.config.tokens_per_image, prompt, image)
    ans = tokenizer.encode(answer_text)
    check_prompt_length(len(ids) + len(ans), model.config, what="the prompt with its answer")
    if not ans:
        raise ValueError("the answer is empty: nothing to score")
    if not ids:
        raise ValueError("the prompt is empty: the first answer token has nothing to be conditioned on")
    device = next(model.parameters()).device
    full = torch.tensor([ids + ans], device=device)
    pixel_values, slots = load_views(model, images)
    logits = model(full, pixel_values=pixel_values, view_slots=slots).logits[0].float()
    logprobs = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)
    picked = logprobs.gather(1, torch.tensor(ans, device=device)[:, None])[:, 0].tolist()
    tokens = [{"id": t, "text": tokenizer.decode([t]), "logprob": lp} for t, lp in zip(ans, picked)]
    total = float(sum(picked))
    return {"tokens": tokens, "sum_logprob": total, "mean_nll": -total / len(ans), "num_tokens": len(ans)}


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_inference(model_dir: str | Path, dtype: str = "auto", device: str | None = None):
    """Load a model folder (monkeytune or official) and its tokenizer for inference.

    Args:
        model_dir: The folder.
        dtype: ``auto`` (as stored), ``float32``, ``bfloat16`` or ``float16``.
        device: Default: ``cuda`` when available, else ``cpu``.

    Raises:
        monkeytune.model.io.ModelFolderError: the folder cannot be loaded or has no tokenizer.
    """
    from monkeytune.model.io import ModelFolderError, load_model

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_dir, dtype=DTYPES[dtype], device=device)
    if tokenizer is None:
        raise ModelFolderError(f"{model_dir} has no tokenizer files (qwen.tiktoken or tokenizer.json)")
    model.config.check_tokenizer(tokenizer)
    return model, tokenizer


class ChatSession:
    """A conversation with one model: ChatML keeps the history, other templates answer each turn afresh.

    The image (if any) goes into the first ChatML user turn, or into every single-turn prompt.
    """

    def __init__(self, model: Any, tokenizer: Any, template: str | None = None, image: str | None = None,
                 settings: GenerationSettings | None = None, system: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or default_template(model)
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of {TEMPLATES}")
        self.image, self.settings, self.system = image, settings or GenerationSettings(), system
        self.history: list[tuple[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, stream: TextIO | Callable[[str], Any] | None = None) -> str:
        """Answer ``text`` (streaming to ``stream`` when given) and remember the exchange for ChatML."""
        multi = self.template in CHAT_TEMPLATES
        image = self.image if not (multi and self.history) else None
        ids, images = prompt_ids(self.template, self.tokenizer, self.model.config.tokens_per_image, text, image,
                                 self.history if multi else (), self.system, config=self.model.config,
                                 max_new_tokens=self.settings.max_new_tokens)
        streamer = TokenStreamer(self.tokenizer, stream) if stream is not None else None
        new = generate_ids(self.model, self.tokenizer, [(ids, images)], self.settings,
                           stop_ids(self.tokenizer, self.template), streamer=streamer)
        reply = self.tokenizer.decode(new[0]).strip()
        if multi:
            self.history.append((user_text(self.template, text, image), reply))
        return reply


def run_interactive(session: ChatSession, lines: Any, out: TextIO, prompt: TextIO | None = None) -> int:
    """Read questions line by line and stream answers.

    Lines ``/reset`` (forget the conversation), ``/image PATH`` (switch image; resets) and
    ``/quit`` are commands. Returns the number of questions answered.
    """
    answered = 0
    while True:
        if prompt is not None:
            prompt.write(">>> ")
            prompt.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/image"):
            session.image = text[len("/image"):].strip() or None
            session.reset()
            continue
        session.ask(text, stream=out)
        out.write("\n")
        out.flush()
        answered += 1
    return answered
