"""Answer-scoring metrics for VQA-style evaluation.

Every metric is a pure function ``metric(predictions, references) -> float`` in ``[0, 1]``
(the mean over samples), where each reference is one string or a list of acceptable strings.
:data:`METRICS` names them all; :func:`compute_metrics` runs several at once and
:func:`sample_scores` gives the per-sample values.

## Two families: Monkey-compatible and corrected

**Monkey-compatible** (``monkey_*``) reproduce the numbers of the official Monkey evaluation
scripts (``eval/evaluate_vqa.py`` and ``eval/vqa_eval.py``), quirks included, so results can be
compared with published tables:

- ``monkey_vqa_score``: the prediction is normalised (newlines and tabs to spaces, punctuation,
  number words to digits, articles dropped, lowercase, contractions), but the ground-truth
  answers only get the punctuation step, and only when they are not all identical; they are not
  lowercased. Each answer earns ``min(1, matches among the other answers / 3)`` and the sample
  scores the mean (answers are told apart by position, as the annotation files' distinct
  ``answer_id`` fields make the original do). With a single reference there are no "other"
  answers, so the score is always 0. Periods not followed by a digit are deleted, at most 32 per
  answer (the original passes ``re.UNICODE`` where the replacement count goes). The printed
  number is ``round(100 * score, 2)``.
- ``monkey_anls``: the Levenshtein distance is taken on lowercased, stripped strings but divided
  by the length of the *raw* ground truth or stripped prediction, whichever is longer, so spaces
  around a ground truth lower the distance. A similarity of exactly 0.5 is kept (0.5), whereas
  ANLS zeroes it.
- ``monkey_relaxed_accuracy``: the ground truth and the prediction are swapped when calling the
  pix2struct-style check, so the 5% tolerance is measured relative to the *prediction*
  (``|gt - pred| <= 0.05 * |pred|``), and a prediction of 0 falls back to string equality
  (``"0.0"`` is wrong against ``"0"``). Percent signs divide by 100.
- ``monkey_contains_accuracy``: what the official scripts call "accuracy" (GQA, AI2D, WTQ,
  DeepForm, KLC, and every dataset of the document-model script) is containment: correct when a lowercased, stripped ground truth occurs anywhere in the
  lowercased prediction with all its periods removed (so ``"3.5"`` counts for ground truth
  ``"35"``, but not for ground truth ``"3.5"``; an empty ground truth always matches).
- ``monkey_gqa_contains_accuracy``: containment after the official GQA answer clean-up
  (:func:`monkey_gqa_clean`): cut at the first ``.``, ``,`` or ``!``, lowercase, keep what
  follows the first ``is ``, ``are ``, ``a ``, ``an ``, ``the `` (matched anywhere, even inside
  words: ``"banana split"`` becomes ``"split"``) and what precedes ``" of"``.

**Corrected** (the defaults, unprefixed) keep each metric's intent and apply it evenly:

- ``vqa_score``: the full VQA normalisation (:func:`normalize_answer`) on both sides, the same
  leave-one-out ``min(1, matches / 3)`` credit; with ``n < 4`` references the bar is
  ``min(3, n - 1)`` agreeing answers, and a single reference is plain normalised exact match.
- ``anls``: standard ANLS: lowercase, whitespace collapsed on both sides, distance divided by
  the longer *normalised* string, similarity ``1 - d`` kept only when ``d < 0.5``.
- ``relaxed_accuracy``: ``|pred - gt| <= 5% of |gt|`` (the ground truth is the yardstick); a
  zero ground truth needs a numerically zero prediction; non-numbers need normalised equality.
  ``%`` divides by 100 on either side, ``1,234`` reads as 1234.
- ``exact_match``: normalised prediction equals a normalised reference.

Why both: the Monkey numbers are only comparable with Monkey's own tables when computed the
same way, while the corrected scores do not reward verbose or differently-cased answers
unevenly, so they are the ones to use when comparing fine-tuning runs.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

Reference = str | Sequence[str]

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation tables (the standard VQA evaluation's data).

_PUNCT = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+",
    "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
# Written in the original as "(?!<=\d)(\.)(?!\d)": the first group is a look-ahead, not the
# intended look-behind, so in effect every period not followed by a digit is removed.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_MONKEY_MAX_PERIODS = 32  # re.UNICODE == 32, passed where re.sub takes its count
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions as the VQA table lists them; it maps every spelling that drops exactly one of the
# apostrophes to the full form. Capitalised entries never fire (words are lowercased first) but
# are kept so that the table behaves exactly like the original.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've "
    "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        for i, ch in enumerate(full):
            if ch == "'":
                table[full[:i] + full[i + 1 :]] = full
    # Three irregular entries of the original table ("somebody'd" really is mapped backwards).
    table.update({"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"})
    return table


_CONTRACTIONS = _build_contractions()


def _strip_punctuation(text: str, max_periods: int) -> str:
    """VQA punctuation step: marks next to a space (or any text with ``digit,digit``) vanish,
    other marks become spaces; then periods not followed by a digit go (``0`` = no limit)."""
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        # The test looks at the input text, not the partly cleaned one, as in the original.
        if glue or (p + " " in text or " " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=max_periods)


def _digits_articles(text: str) -> str:
    """VQA word step: lowercase, number words to digits, drop articles, expand contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Standard VQA answer normalisation (no limit on removed periods).

    Example: ``"The two dogs."`` -> ``"2 dogs"``; ``"3.5"`` stays ``"3.5"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_strip_punctuation(text, max_periods=0))


def _refs(references: Reference, index: int) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError(f"sample {index}: references are empty")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"sample {index}: reference {r!r} is not a string")
    return refs


def _levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), by rapidfuzz's C++ code.

    Long document answers made the pure-Python dynamic programme the slowest part of scoring
    (``bench/anls.py`` measures the difference).
    """
    return Levenshtein.distance(a, b)


def _leave_one_out(pred: str, answers: list[str], bar: int) -> float:
    """Mean over answers of ``min(1, matches among the other answers / bar)``."""
    credit = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == pred)
        credit.append(min(1.0, matches / bar))
    return sum(credit) / len(credit)


# ---------------------------------------------------------------------------------------------
# Monkey-compatible per-sample scores.


def _monkey_vqa_sample(pred: str, refs: list[str]) -> float:
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    pred = _digits_articles(_strip_punctuation(pred, _MONKEY_MAX_PERIODS))
    if len(set(refs)) > 1:
        refs = [_strip_punctuation(r, _MONKEY_MAX_PERIODS) for r in refs]
    return _leave_one_out(pred, refs, 3)


def _monkey_anls_sample(pred: str, refs: list[str]) -> float:
    pred = pred.strip()
    distances = []
    for gt in refs:
        length = max(len(gt), len(pred))  # raw ground truth, stripped prediction
        d = _levenshtein(gt.lower().strip(), pred.lower().strip())
        distances.append(0.0 if length == 0 else d / length)
    score = 1 - min(distances)
    return 0.0 if score < 0.5 else score


def _pix2struct_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _monkey_relaxed_sample(pred: str, refs: list[str]) -> float:
    pred = pred.strip()
    denom = _pix2struct_float(pred)  # the prediction ends up as the "target"
    for gt in refs:
        value = _pix2struct_float(gt)
        if value is not None and denom:
            ok = abs(value - denom) / abs(denom) <= 0.05
        else:
            ok = gt.lower() == pred.lower()
        if ok:
            return 1.0
    return 0.0


def _monkey_contains_sample(pred: str, refs: list[str]) -> float:
    haystack = pred.strip().lower().replace(".", "")
    return 1.0 if any(gt.strip().lower() in haystack for gt in refs) else 0.0


# TextMonkey's document answers carry grounding spans; the official document scorer deletes them
# (tag and content, shortest match, never across a line break) before looking for the reference.
_DOC_GROUNDING = re.compile(r"<(point|box)>.*?</\1>")


def _monkey_doc_contains_sample(pred: str, refs: list[str]) -> float:
    # Unlike the Monkey rule, periods stay: "3.5" does not contain "35" here.
    haystack = _DOC_GROUNDING.sub("", pred).lower()
    return 1.0 if any(gt.strip().lower() in haystack for gt in refs) else 0.0


def monkey_gqa_clean(response: str) -> str:
    """The official GQA answer clean-up, applied to a prediction before containment scoring."""
    r = response.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for lead in ("is ", "are ", "a ", "an ", "the "):
        if lead in r:
            r = r.split(lead)[1]
    if " of" in r:
        r = r.split(" of")[0]
    return r.strip()


def _monkey_gqa_sample(pred: str, refs: list[str]) -> float:
    return _monkey_contains_sample(monkey_gqa_clean(pred), refs)


# ---------------------------------------------------------------------------------------------
# Corrected per-sample scores.


def _vqa_sample(pred: str, refs: list[str]) -> float:
    pred = normalize_answer(pred)
    refs = [normalize_answer(r) for r in refs]
    if len(refs) == 1:
        return float(pred == refs[0])
    return _leave_one_out(pred, refs, min(3, len(refs) - 1))


def _anls_sample(pred: str, refs: list[str]) -> float:
    pred = " ".join(pred.lower().split())
    best = 0.0
    for gt in refs:
        gt = " ".join(gt.lower().split())
        length = max(len(gt), len(pred))
        d = 0.0 if length == 0 else _levenshtein(gt, pred) / length
        if d < 0.5:
            best = max(best, 1.0 - d)
    return best


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def _parse_number(text: str) -> float | None:
    s = text.strip()
    scale = 1.0
    if s.endswith("%"):
        s, scale = s[:-1].strip(), 0.01
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return value * scale if np.isfinite(value) else None


def _relaxed_sample(pred: str, refs: list[str]) -> float:
    p = _parse_number(pred)
    for gt in refs:
        g = _parse_number(gt)
        if p is not None and g is not None:
            ok = p == g if g == 0 else abs(p - g) / abs(g) <= 0.05
        else:
            ok = normalize_answer(pred) == normalize_answer(gt)
        if ok:
            return 1.0
    return 0.0


def _exact_sample(pred: str, refs: list[str]) -> float:
    pred = normalize_answer(pred)
    return 1.0 if any(normalize_answer(r) == pred for r in refs) else 0.0


# ---------------------------------------------------------------------------------------------
# Aggregation and registry.

SampleScorer = Callable[[str, list[str]], float]

SAMPLE_SCORERS: dict[str, SampleScorer] = {
    "vqa_score": _vqa_sample,
    "anls": _anls_sample,
    "relaxed_accuracy": _relaxed_sample,
    "exact_match": _exact_sample,
    "monkey_vqa_score": _monkey_vqa_sample,
    "monkey_anls": _monkey_anls_sample,
    "monkey_relaxed_accuracy": _monkey_relaxed_sample,
    "monkey_contains_accuracy": _monkey_contains_sample,
    "monkey_gqa_contains_accuracy": _monkey_gqa_sample,
    "monkey_doc_contains_accuracy": _monkey_doc_contains_sample,
}


def sample_scores(
    name: str, predictions: Sequence[str], references: Sequence[Reference]
) -> list[float]:
    """Per-sample scores of metric ``name``.

    Args:
        name: A key of :data:`METRICS`.
        predictions: One answer string per sample.
        references: Per sample, one string or a non-empty list of acceptable strings.

    Raises:
        KeyError: unknown metric (the message lists the known ones).
        ValueError: lengths differ, no samples, or a sample without references.
        TypeError: a prediction or reference that is not a string.
    """
    if name not in SAMPLE_SCORERS:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(sorted(SAMPLE_SCORERS))}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no samples to score")
    scorer = SAMPLE_SCORERS[name]
    out = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise TypeError(f"sample {i}: prediction {pred!r} is not a string")
        out.append(scorer(pred, _refs(refs, i)))
    return out


def _metric(name: str, doc: str) -> Callable[[Sequence[str], Sequence[Reference]], float]:
    def metric(predictions: Sequence[str], references: Sequence[Reference]) -> float:
        scores = sample_scores(name, predictions, references)
        if name == "monkey_anls":
            return float(np.mean(scores))  # numpy's pairwise sum, as the original
        return sum(scores) / len(scores)

    metric.__name__ = name
    metric.__doc__ = doc + "\n\nReturns the mean over samples, in [0, 1]; see the module docstring."
    return metric


vqa_score = _metric("vqa_score", "VQA accuracy with full normalisation of both sides.")
anls = _metric("anls", "Average normalised Levenshtein similarity (threshold 0.5).")
relaxed_accuracy = _metric("relaxed_accuracy", "Numbers within 5% of the ground truth, else exact.")
exact_match = _metric("exact_match", "Normalised exact match against any reference.")
monkey_vqa_score = _metric("monkey_vqa_score", "VQA score as the official Monkey vqa_eval.py.")
monkey_anls = _metric("monkey_anls", "ANLS as the official Monkey evaluate_vqa.py.")
monkey_relaxed_accuracy = _metric("monkey_relaxed_accuracy", "Relaxed accuracy as official Monkey.")
monkey_contains_accuracy = _metric(
    "monkey_contains_accuracy", "Official Monkey 'accuracy': reference contained in prediction."
)
monkey_gqa_contains_accuracy = _metric(
    "monkey_gqa_contains_accuracy", "Official Monkey GQA clean-up, then containment."
)
monkey_doc_contains_accuracy = _metric(
    "monkey_doc_contains_accuracy",
    "TextMonkey's document scorer: <point>/<box> spans deleted, then case-insensitive containment "
    "of any stripped reference, periods kept.",
)

METRICS: dict[str, Callable[[Sequence[str], Sequence[Reference]], float]] = {
    f.__name__: f
    for f in (
        vqa_score, anls, relaxed_accuracy, exact_match, monkey_vqa_score, monkey_anls,
        monkey_relaxed_accuracy, monkey_contains_accuracy, monkey_gqa_contains_accuracy,
        monkey_doc_contains_accuracy,
    )
}  # fmt: skip


def compute_metrics(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[Reference]
) -> dict[str, float]:
    """Run several metrics on the same predictions.

    Returns:
        ``{name: score}`` in the order of ``names``.

    Raises:
        KeyError / ValueError / TypeError: as :func:`sample_scores`.
    """
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {unknown}; known: {', '.join(sorted(METRICS))}")
    return {name: METRICS[name](predictions, references) for name in names}
