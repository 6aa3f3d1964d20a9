"""Answering a file of questions in batches (``monkeytune chat --questions FILE --answers OUT``).

:func:`read_questions` checks the file (before a model is loaded); :func:`answer_questions`
answers and writes.

The questions file is JSON Lines (or a JSON list), one question per record::

    {"image": "images/0001.jpg", "question": "What is written on the sign?", "question_id": 17}

``question`` is required; ``image`` is optional and resolved against the questions file's folder
unless absolute; ``question_id`` defaults to the line number and must be unique, so answers can
be joined back. Any other fields are carried over. The answers file holds the same records (the
image as written) with ``question_id`` set and the generated ``answer`` added; it is written
only once every question is answered (through a temporary file), never half.

Generation is :func:`monkeytune.eval.runner.generate_answers`, as in ``monkeytune eval``; the
prompt template defaults to the one the model folder records
(:func:`monkeytune.generate.default_template`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from monkeytune.data.errors import MALFORMED_RECORD, MISSING_IMAGE, DataError
from monkeytune.data.reading import iter_raw_records
from monkeytune.eval.runner import generate_answers
from monkeytune.generate import GenerationSettings, default_template

ANSWER_FIELD = "answer"


def read_questions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and check a questions file.

    Returns:
        Per record: ``record`` (the fields as written, ``question_id`` filled in), ``question``,
        ``question_id`` and ``image`` (resolved path or None).

    Raises:
        DataError: naming the file, line and field of the first bad record (a one-line message).
    """
    path = Path(path)
    out: list[dict[str, Any]] = []
    seen: dict[Any, int] = {}
    for index, line, obj in iter_raw_records(path):
        if isinstance(obj, DataError):
            raise obj

        def bad(field: str, reason: str, kind: str = MALFORMED_RECORD) -> DataError:
            return DataError(kind, reason, str(path), line, index, field)

        if not isinstance(obj, dict):
            raise bad("", f"expected a JSON object with a question, got {type(obj).__name__}")
        question = obj.get("question")
        if not isinstance(question, str):
            raise bad("question", f"must be a string, got {question!r}")
        if ANSWER_FIELD in obj:
            # The reply goes there: overwriting a reference answer would lose it without a word.
            raise bad(ANSWER_FIELD, "is where the generated answer goes; rename it (e.g. to 'reference'), "
                      "or score against it with monkeytune eval")
        qid = obj.get("question_id", line)
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise bad("question_id", f"must be a string or an integer, got {qid!r}")
        if qid in seen:
            raise bad("question_id", f"{qid!r} was already used on line {seen[qid]}; answers could not be told apart")
        seen[qid] = line
        image = obj.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise bad("image", f"must be a non-empty string path, got {image!r}")
            resolved = Path(image).expanduser()
            resolved = resolved if resolved.is_absolute() else path.parent / resolved
            if not resolved.is_file():
                raise bad("image", f"file {resolved} not found", MISSING_IMAGE)
            image = str(resolved)
        out.append({"record": {**obj, "question_id": qid}, "question": question, "question_id": qid, "image": image})
    if not out:
        raise DataError(MALFORMED_RECORD, "no questions in the file", str(path))
    return out


def answer_questions(
    model: Any,
    tokenizer: Any,
    records: list[dict[str, Any]],
    answers: str | os.PathLike,
    template: str | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], Any] | None = None,
) -> int:
    """Answer the questions :func:`read_questions` read and write the records with their answers.

    Args:
        model: A loaded model (see :func:`monkeytune.generate.load_for_inference`).
        tokenizer: Its tokenizer.
        records: From :func:`read_questions`.
        answers: The JSON Lines file to write (its folder is created).
        template: Prompt template; None: the one the model folder records.
        settings: Generation settings (default: greedy, 256 new tokens).
        batch_size: Questions generated together.
        progress: Called with ``(done, total)`` after each batch.

    Returns:
        The number of questions answered.

    Raises:
        PromptTooLongError, GenerationTimeout, ImageLoadError: as in generation.
    """
    template = template or default_template(model)
    texts = generate_answers(model, tokenizer, records, template, settings or GenerationSettings(), batch_size, progress)
    out = Path(answers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec, text in zip(records, texts):
            f.write(json.dumps({**rec["record"], ANSWER_FIELD: text}, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)
