"""Batched VQA-style evaluation in Monkey's data format.

An evaluation file is JSON Lines, one question per line::

    {"image": "images/0001.jpg", "question": "What is written on the sign?",
     "answer": ["stop", "stop sign"], "question_id": 17}

``answer`` is one string or a list of acceptable strings (optional when only predicting);
``image`` is optional and resolved against the data file's folder unless absolute;
``question_id`` defaults to the line number. Predictions are generated greedily, several
questions per batch (left-padded), and scored with :mod:`monkeytune.eval.metrics`.

A file of conversation records in any training format (monkey, llava, sharegpt, openai; see
:mod:`monkeytune.data.messages`) is read too: each record gives one question, its first user
turn (text, and at most one image), and the reference answer is its first assistant turn.

A predictions file (one JSON per line) can be scored without a model: each line holds
``prediction`` and ``answer`` (references), or the official scripts' output layout ``answer``
(the prediction) and ``annotation`` (references).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from monkeytune.eval.metrics import compute_metrics
from monkeytune.generate import GenerationSettings, generate_ids, prompt_ids, stop_ids
from monkeytune.limits import PromptTooLongError

DEFAULT_METRICS = ("vqa_score", "exact_match")


class EvalDataError(ValueError):
    """A malformed evaluation or predictions record; the message names file, line and field."""


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((lineno, rec))
    if not out:
        raise EvalDataError(f"{path}: no records")
    return out


def _check_refs(value: Any, where: str, field: str) -> None:
    ok = isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    )
    if not ok:
        raise EvalDataError(f"{where}: field {field!r} must be a string or a non-empty list of strings, got {value!r}")


def _conversation_records(path: Path) -> list[dict[str, Any]]:
    from monkeytune.data.reading import load_samples
    from monkeytune.data.errors import DataError

    try:
        samples = load_samples(path)
    except DataError as e:
        raise EvalDataError(e.describe()) from None
    records = []
    for s in samples:
        user, answer = s.turns[0], s.turns[1]
        images = user.images
        if len(images) > 1:
            raise EvalDataError(
                f"{s.error('', '').location}: {user.field}: an evaluation question takes at most one "
                f"image, this one has {len(images)}"
            )
        if images and images[0].inline:
            raise EvalDataError(f"{s.error('', '').location}: {images[0].field}: inline images are not supported by eval")
        if images and not Path(images[0].source).is_file():
            raise EvalDataError(f"{s.error('', '').location}: {images[0].field}: file {images[0].source} not found")
        records.append({
            "question_id": s.extra.get("question_id", s.id),
            "image": images[0].source if images else None,
            "question": user.plain_text.strip(),
            "answer": answer.plain_text.strip(),
        })
    if not records:
        raise EvalDataError(f"{path}: no records")
    return records


def read_eval_records(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate an evaluation file: question records, or conversations in any
    training format (see the module docstring).

    Returns:
        Records with ``question``, ``question_id``, ``answer`` (or None), and ``image`` resolved
        to a path (or None).

    Raises:
        EvalDataError: naming the file, line and field of the first bad record.
    """
    path = Path(path)
    with open(path, "rb") if path.is_file() else open(os.devnull, "rb") as f:
        head = f.read(65536).lstrip()
    if head.startswith(b"[") or b'"conversations"' in head.split(b"\n", 1)[0] or b'"messages"' in head.split(b"\n", 1)[0]:
        return _conversation_records(path)
    records = []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        question = rec.get("question")
        if not isinstance(question, str):
            raise EvalDataError(f"{where}: field 'question' must be a string, got {question!r}")
        image = rec.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise EvalDataError(f"{where}: field 'image' must be a non-empty string path, got {image!r}")
            resolved = Path(image).expanduser()
            resolved = resolved if resolved.is_absolute() else path.parent / resolved
            if not resolved.is_file():
                raise EvalDataError(f"{where}: field 'image': file {resolved} not found")
            image = str(resolved)
        if rec.get("answer") is not None:
            _check_refs(rec["answer"], where, "answer")
        records.append({
            "question_id": rec.get("question_id", lineno),
            "image": image,
            "question": question,
            "answer": rec.get("answer"),
        })
    return records


def read_predictions(path: str | Path) -> tuple[list[str], list[Any]]:
    """Read a predictions JSONL file as ``(predictions, references)`` (see the module docstring)."""
    path = Path(path)
    preds, refs = [], []
    for lineno, rec in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prediction" in rec:
            pred, ref, ref_field = rec["prediction"], rec.get("answer"), "answer"
        elif "annotation" in rec:
            pred, ref, ref_field = rec.get("answer"), rec["annotation"], "annotation"
        else:
            raise EvalDataError(f"{where}: expected fields 'prediction' and 'answer' (or 'answer' and 'annotation')")
        if not isinstance(pred, str):
            raise EvalDataError(f"{where}: the prediction must be a string, got {pred!r}")
        _check_refs(ref, where, ref_field)
        preds.append(pred)
        refs.append(ref)
    return preds, refs


ANSWER_MARGIN = 4  # tokens past the longest reference: room for a stop token and small variations
MIN_NEW_TOKENS = 8
UNSCORED_NEW_TOKENS = 64  # records without answers give no length to go by


def default_max_new_tokens(tokenizer: Any, records: Sequence[dict[str, Any]]) -> int:
    """The answer length limit the references call for (see :func:`evaluate`)."""
    lengths = [len(tokenizer.encode(a)) for r in records
               for a in ([r["answer"]] if isinstance(r.get("answer"), str) else r.get("answer") or [])]
    if not lengths:
        return UNSCORED_NEW_TOKENS
    return max(MIN_NEW_TOKENS, max(lengths) + ANSWER_MARGIN)


def generate_answers(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    template: str,
    settings: GenerationSettings,
    batch_size: int = 8,
    progress: Callable[[int, int], Any] | None = None,
) -> list[str]:
    """Answer every record's ``question`` (about its ``image``, if any), ``batch_size`` at a time.

    Shared by :func:`evaluate` and ``monkeytune chat --questions`` (:mod:`monkeytune.eval.batch`).

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM` (put in eval mode here).
        tokenizer: Its tokenizer.
        records: Dicts with ``question``, optional ``image`` (a resolved path) and ``question_id``.
        template: Prompt template.
        settings: Generation settings (length limit, sampling, time limit per batch).
        batch_size: Questions generated together (left-padded).
        progress: Called with ``(done, total)`` after each batch.

    Raises:
        PromptTooLongError: a question too long for the model (every record is checked before
            anything is generated; the record is named).
        GenerationTimeout: a batch ran past ``settings.time_limit_s``.

    Returns:
        One stripped answer per record, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    tpi = model.config.tokens_per_image
    stops = stop_ids(tokenizer, template)
    prompts = []
    for i, r in enumerate(records):
        try:
            prompts.append(prompt_ids(template, tokenizer, tpi, r["question"], r.get("image"),
                                      config=model.config, max_new_tokens=settings.max_new_tokens))
        except PromptTooLongError as e:
            raise PromptTooLongError(f"record {i + 1} (question_id {r.get('question_id')!r}): {e}") from None
    answers: list[str] = []
    for start in range(0, len(records), batch_size):
        new = generate_ids(model, tokenizer, prompts[start : start + batch_size], settings, stops)
        answers.extend(tokenizer.decode(ids).strip() for ids in new)
        if progress is not None:
            progress(len(answers), len(records))
    return answers


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 8,
    template: str = "vqa",
    max_new_tokens: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
    time_limit_s: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate an answer for every record and score them.

    Args:
        model: A :class:`~monkeytune.model.MonkeyForCausalLM` (put in eval mode here).
        tokenizer: Its tokenizer.
        records: As :func:`read_eval_records` returns (``image`` paths already resolved).
        metrics: Metric names; records without ``answer`` are predicted but not scored.
        batch_size: Questions generated together (left-padded).
        template: Prompt template (``vqa``, ``caption``, ``chatml``, ``raw``).
        max_new_tokens: Answer length limit. None: from the references, the longest one's
            tokens plus :data:`ANSWER_MARGIN` (at least :data:`MIN_NEW_TOKENS`), so one-word answers
            are not generated 32 tokens long; 64 when no record has an answer.
        progress: Called with ``(done, total)`` after each batch.
        time_limit_s: Longest one batch's generation may take (None: no limit).

    Raises:
        PromptTooLongError: a question too long for the model (checked for every record before
            anything is generated; the record is named).
        GenerationTimeout: a batch ran past ``time_limit_s``.

    Returns:
        ``(predictions, scores)``: one dict per record (``question_id``, ``image``, ``question``,
        ``prediction``, ``answer``) and ``{metric: value}`` over the records that have answers
        (empty when none do).
    """
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, records)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, time_limit_s=time_limit_s)
    answers = generate_answers(model, tokenizer, records, template, settings, batch_size, progress)
    predictions = [{"question_id": rec.get("question_id"), "image": rec.get("image"), "question": rec["question"],
                    "prediction": text, "answer": rec.get("answer")} for rec, text in zip(records, answers)]
    scored = [p for p in predictions if p["answer"] is not None]
    scores: dict[str, float] = {}
    if scored and metrics:
        scores = compute_metrics(list(metrics), [p["prediction"] for p in scored], [p["answer"] for p in scored])
    return predictions, scores


def write_results(out_dir: str | Path, predictions: Sequence[dict[str, Any]] | None, scores: dict[str, float]) -> Path:
    """Write ``predictions.jsonl`` (when given) and ``metrics.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if predictions is not None:
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
    return out
