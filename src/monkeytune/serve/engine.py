"""The model side of the web chat: conversation state in, streamed answer text out.

One :class:`ChatEngine` owns one loaded model. Every generation holds the engine's lock for its
whole duration, so two users never interleave inside one generation: the second waits until
the first answer is finished (the web queue also runs one event at a time; the lock covers any
other caller). A generation whose reader goes away (browser tab closed, Stop pressed, client
disconnected) is stopped at the next token, so the lock is never held by an answer nobody reads.

Prompts are rendered by :mod:`monkeytune.generate` with the same templates and the same
conversation rules as ``monkeytune chat`` (see :meth:`ChatEngine.prompt`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from monkeytune.generate import GenerationSettings, TokenStreamer, default_template, generate_ids, prompt_ids, stop_ids
from monkeytune.prompts import CHAT_TEMPLATES, user_text
from monkeytune.serve.launch import DEFAULT_TIME_LIMIT_S
from monkeytune.serve.tiling import TilingView, describe_tiling
from monkeytune.serve.uploads import UploadLimits

__all__ = ["ChatEngine", "DEFAULT_TIME_LIMIT_S", "Exchange", "TEMPLATE_LABELS", "MAX_NEW_TOKENS", "settings_from_form"]

# Keys are monkeytune.generate template names.
TEMPLATE_LABELS = {
    "vqa": "VQA (short answer)",
    "vqa-question-first": "VQA, question before the image",
    "caption": "Caption",
    "chatml": "Free chat (ChatML)",
    "tokenizer": "Free chat (the model's own chat template)",
    "raw": "Raw text",
}
MAX_NEW_TOKENS = 2048


@dataclass
class Exchange:
    """One question of the chat and its answer.

    Attributes:
        question: What the user typed.
        image: Path of the image current when the question was asked (None: no image yet).
        answer: The model's answer (empty while it is being generated).
    """

    question: str
    image: str | None = None
    answer: str = ""


def _number(value, name: str) -> float:
    """``value`` as a float; ``ValueError`` naming the setting when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def settings_from_form(max_new_tokens: float, sampling: bool, temperature: float, top_p: float) -> GenerationSettings:
    """Decoding settings from the page's controls (greedy unless ``sampling``).

    Raises:
        ValueError: a setting out of range, named in the message.
    """
    max_new = _number(max_new_tokens, "max new tokens")
    if not 1 <= max_new <= MAX_NEW_TOKENS:
        raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    max_new = int(max_new)
    if not sampling:
        return GenerationSettings(max_new_tokens=max_new, temperature=0.0)
    temperature = _number(temperature, "temperature")
    if not temperature > 0:
        raise ValueError(f"temperature must be above 0 when sampling, got {temperature}")
    top_p = _number(top_p, "top-p")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1] when sampling, got {top_p}")
    return GenerationSettings(max_new_tokens=max_new, temperature=float(temperature), top_p=float(top_p))


class _Cancelled(StoppingCriteria):
    """Ends generation once ``event`` is set (checked after every token)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """A loaded model ready to answer chat turns, one generation at a time.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM` in eval mode.
        tokenizer: Its tokenizer.
        name: Shown in the page header (usually the model folder's name).
        template: Template preselected in the page (a key of :data:`TEMPLATE_LABELS`); default:
            ``chatml`` for chat-format models, else ``vqa``.
        limits: Upload limits.
        time_limit_s: Longest a generation may run (seconds) before it is stopped at the next
            token; None: no limit. Waiting for the generation slot does not count.

    Raises:
        ValueError: the tokenizer does not fit the model, or an unknown template.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        name: str = "model",
        template: str | None = None,
        limits: UploadLimits = UploadLimits(),
        time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
    ) -> None:
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"the time limit must be above 0 seconds, got {time_limit_s}")
        self.time_limit_s = time_limit_s
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.limits = limits
        cfg = model.config
        cfg.check_tokenizer(tokenizer)
        self.tiling_view = TilingView(cfg.image)
        self.tiling_summary = describe_tiling(cfg.image, cfg.tokens_per_view)
        self.default_template = template or default_template(model)
        if self.default_template not in TEMPLATE_LABELS:
            raise ValueError(f"unknown template {self.default_template!r}; choose one of {sorted(TEMPLATE_LABELS)}")
        self._lock = threading.Lock()

    @classmethod
    def from_dir(cls, directory: str | Path, dtype: str = "auto", device: str | None = None, **kwargs) -> "ChatEngine":
        """Load a monkeytune or official model folder (weights and tokenizer) for inference.

        Args:
            directory: The folder.
            dtype: ``auto`` (as stored), ``float32``, ``bfloat16`` or ``float16``.
            device: Default: ``cuda`` when available, else ``cpu``.
            **kwargs: Passed to the constructor.

        Raises:
            ModelFolderError: the folder is not a loadable model or has no tokenizer.
        """
        from monkeytune.generate import load_for_inference

        model, tokenizer = load_for_inference(directory, dtype=dtype, device=device)
        kwargs.setdefault("name", Path(directory).resolve().name)
        return cls(model.eval(), tokenizer, **kwargs)

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def templates() -> dict[str, str]:
        """Template key -> label shown in the page."""
        return dict(TEMPLATE_LABELS)

    def check_turn(self, history: list[Exchange], template: str) -> None:
        """Raise ``ValueError`` with a message for the page when the last turn cannot be asked."""
        if template not in TEMPLATE_LABELS:
            raise ValueError(f"unknown prompt template {template!r}; choose one of {sorted(TEMPLATE_LABELS)}")
        turn = history[-1]
        if "<img>" in turn.question or "</img>" in turn.question:
            # Image tags name server-side files: only uploads may become images.
            raise ValueError("the question may not contain <img> or </img>; upload the image instead")
        if template != "caption" and not turn.question:
            raise ValueError("type a question first")
        if template == "caption" and turn.image is None:
            raise ValueError("the caption template needs an image: upload or paste one first")

    def prompt(self, history: list[Exchange], template: str, max_new_tokens: int = 0) -> tuple[list[int], list[str]]:
        """Token ids of the prompt answering the last exchange of ``history``, and its image paths.

        As in ``monkeytune chat``: ``chatml`` keeps the conversation (the exchanges since the
        image last changed, the image in the first of them); the other templates answer the
        last question on its own, with the current image.

        Raises:
            ValueError: the turn cannot be asked; :class:`~monkeytune.limits.PromptTooLongError`
                when the prompt cannot fit before ``max_new_tokens`` new tokens (checked from the
                raw length before tokenizing).
        """
        self.check_turn(history, template)
        last = history[-1]
        start = len(history) - 1
        if template in CHAT_TEMPLATES:
            while start > 0 and history[start - 1].image == last.image:
                start -= 1
        earlier = history[start:-1]
        rendered = [(user_text(template, ex.question, ex.image if i == 0 else None), ex.answer) for i, ex in enumerate(earlier)]
        image = None if earlier else last.image
        return prompt_ids(template, self.tokenizer, self.model.config.tokens_per_image, last.question, image, rendered,
                          config=self.model.config, max_new_tokens=max_new_tokens)

    # ------------------------------------------------------------------ generation
    def stream(self, history: list[Exchange], template: str, settings: GenerationSettings) -> Iterator[str]:
        """Answer the last exchange of ``history``, yielding the answer so far each time it grows.

        Holds the engine lock from the first to the last token. Closing the iterator early
        stops generation at the next token.

        Args:
            history: Earlier exchanges (with answers) and, last, the one to answer.
            template: A key of :data:`TEMPLATE_LABELS`.
            settings: Decoding settings.

        Yields:
            The whole answer so far (not the increment).

        Raises:
            ValueError: a bad template, question or setting, or a prompt too long for the model
                (message meant for the user).
            GenerationTimeout: the time limit ended the answer (after the text so far was yielded).
            ImageLoadError: an image of the conversation can no longer be read.
        """
        ids, paths = self.prompt(history, template, settings.max_new_tokens)
        stops = stop_ids(self.tokenizer, template)
        settings.kwargs()  # validates before the lock is taken
        cond = threading.Condition()
        pieces: list[str] = []
        state = {"done": False, "error": None}

        def on_text(piece: str) -> None:
            with cond:
                pieces.append(piece)
                cond.notify_all()

        cancel = threading.Event()
        run_settings = GenerationSettings(
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            {**settings.extra, "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)])},
            time_limit_s=settings.time_limit_s if settings.time_limit_s is not None else self.time_limit_s,
        )

        def run() -> None:
            try:
                streamer = TokenStreamer(self.tokenizer, on_text)
                generate_ids(self.model, self.tokenizer, [(ids, paths)], run_settings, stops, streamer=streamer)
            except BaseException as e:  # re-raised in the reading thread
                state["error"] = e
            finally:
                with cond:
                    state["done"] = True
                    cond.notify_all()

        with self._lock:
            worker = threading.Thread(target=run, name="monkeytune-generate", daemon=True)
            worker.start()
            try:
                seen, text = 0, ""
                while True:
                    with cond:
                        cond.wait_for(lambda: len(pieces) > seen or state["done"])
                        new, done = pieces[seen:], state["done"]
                        seen += len(new)
                    if new:
                        text += "".join(new)
                        yield text
                    if done:
                        break
            finally:
                cancel.set()
                worker.join()
        if state["error"] is not None:
            raise state["error"]

    def answer(self, history: list[Exchange], template: str, settings: GenerationSettings | None = None) -> str:
        """The whole answer to the last exchange (blocking), stripped."""
        text = ""
        for text in self.stream(history, template, settings or GenerationSettings()):
            pass
        return text.strip()
