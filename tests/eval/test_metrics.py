"""Metrics against hand-computed cases; Monkey-compatible versus corrected where they differ."""

import pytest

from monkeytune.eval.metrics import (
    METRICS,
    anls,
    compute_metrics,
    exact_match,
    monkey_anls,
    monkey_contains_accuracy,
    monkey_gqa_clean,
    monkey_doc_contains_accuracy,
    monkey_gqa_contains_accuracy,
    monkey_relaxed_accuracy,
    monkey_vqa_score,
    normalize_answer,
    relaxed_accuracy,
    sample_scores,
    vqa_score,
)


def both(metric_a, metric_b, pred, refs):
    return metric_a([pred], [refs]), metric_b([pred], [refs])


# --- normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The two dogs.", "2 dogs"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.5.", "3.5"),
        ("1,000", "1000"),  # digit,digit: every mark is deleted rather than spaced
        ("red-blue", "red blue"),
        ("hello, world", "hello world"),
        ("x?y", "x y"),
        ("dont", "don't"),
        ("an apple\tand\nnone", "apple and 0"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --- VQA score -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, refs, expected",
    [
        ("Two", ["2"] * 10, 1.0),  # number word in the prediction becomes a digit
        ("the dog", ["dog"] * 10, 1.0),  # article dropped
        ("3.5", ["35"] * 10, 0.0),  # the decimal point is kept
        ("3.5.", ["3.5"] * 10, 1.0),  # the final period is not
        ("dont", ["don't"] * 10, 1.0),  # contraction restored
    ],
)
def test_vqa_normalisation_cases_agree(pred, refs, expected):
    assert both(monkey_vqa_score, vqa_score, pred, refs) == (expected, expected)


def test_vqa_partial_agreement():
    # GT "cat" turns: 1 other "cat" -> 1/3; GT "dog" turns: 2 "cat" among others -> 2/3.
    refs = ["cat"] * 2 + ["dog"] * 8
    expected = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert monkey_vqa_score(["cat"], [refs]) == pytest.approx(expected)
    assert vqa_score(["cat"], [refs]) == pytest.approx(expected)
    assert monkey_vqa_score(["cat", "dog"], [refs, refs]) == pytest.approx((expected + 1.0) / 2)


def test_vqa_monkey_leaves_ground_truth_unnormalised():
    # Ground truths are neither lowercased nor digit-mapped in the official scorer.
    assert both(monkey_vqa_score, vqa_score, "yes", ["Yes"] * 10) == (0.0, 1.0)
    assert both(monkey_vqa_score, vqa_score, "two", ["two"] * 10) == (0.0, 1.0)


def test_vqa_monkey_ground_truth_punctuation_only_when_answers_differ():
    assert monkey_vqa_score(["red blue"], [["red-blue"] * 5 + ["green"] * 5]) == 1.0
    assert monkey_vqa_score(["red blue"], [["red-blue"] * 10]) == 0.0
    assert vqa_score(["red blue"], [["red-blue"] * 10]) == 1.0


def test_vqa_monkey_removes_at_most_32_periods():
    assert both(monkey_vqa_score, vqa_score, "yes" + "." * 40, ["yes"] * 10) == (0.0, 1.0)
    assert monkey_vqa_score(["yes" + "." * 32], [["yes"] * 10]) == 1.0


def test_vqa_few_references():
    assert both(monkey_vqa_score, vqa_score, "cat", "cat") == (0.0, 1.0)
    assert vqa_score(["cat"], [["cat", "dog"]]) == 0.5  # credit comes from the other answer
    assert vqa_score(["cat"], [["cat", "cat", "dog"]]) == pytest.approx((0.5 + 0.5 + 1.0) / 3)


# --- ANLS ------------------------------------------------------------------------------------


def test_anls_threshold_boundary():
    # distance 2 over length 4 = 0.5 exactly: kept by Monkey (score 0.5), zeroed by ANLS.
    assert both(monkey_anls, anls, "abxy", ["abcd"]) == (0.5, 0.0)
    assert both(monkey_anls, anls, "abcx", ["abcd"]) == (0.75, 0.75)
    assert both(monkey_anls, anls, "wxyz", ["abcd"]) == (0.0, 0.0)


def test_anls_monkey_uses_raw_ground_truth_length():
    # Two trailing spaces make the divisor 6: 1 - 2/6 = 2/3 in Monkey, 0 in ANLS.
    m, c = both(monkey_anls, anls, "abxy", ["abcd  "])
    assert m == pytest.approx(2 / 3)
    assert c == 0.0


def test_anls_case_best_reference_and_empty():
    assert both(monkey_anls, anls, " ABC ", ["abc"]) == (1.0, 1.0)
    assert both(monkey_anls, anls, "abcd", ["xyz", "abcd"]) == (1.0, 1.0)
    assert both(monkey_anls, anls, "", [""]) == (1.0, 1.0)
    assert anls(["the  big   cat"], ["The big cat"]) == 1.0


def _reference_levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme, written out here as the reference the library must match."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1,
                              table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[len(a)][len(b)]


def _reference_anls(pred: str, refs: list[str]) -> float:
    pred = " ".join(pred.lower().split())
    best = 0.0
    for gt in refs:
        gt = " ".join(gt.lower().split())
        length = max(len(gt), len(pred))
        d = 0.0 if length == 0 else _reference_levenshtein(gt, pred) / length
        if d < 0.5:
            best = max(best, 1.0 - d)
    return best


def _reference_monkey_anls(pred: str, refs: list[str]) -> float:
    pred = pred.strip()
    dists = [(_reference_levenshtein(gt.lower().strip(), pred.lower()) / max(len(gt), len(pred)))
             if max(len(gt), len(pred)) else 0.0 for gt in refs]
    score = 1 - min(dists)
    return 0.0 if score < 0.5 else score


def test_anls_matches_a_plain_reference_on_random_strings():
    import random

    rng = random.Random(0)
    alphabet = "abcde XYZ.é漢"  # case, spaces, punctuation and non-ASCII all take part
    cases = []
    for _ in range(300):
        refs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(rng.randint(1, 3))]
        # Predictions near a reference as well as unrelated ones, so both sides of 0.5 occur.
        base = rng.choice(refs)
        edited = "".join(c for c in base if rng.random() > 0.2)
        edited += "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        cases.append((rng.choice([edited, "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))]), refs))
    preds, refs = [p for p, _ in cases], [r for _, r in cases]
    got_anls = sample_scores("anls", preds, refs)
    got_monkey = sample_scores("monkey_anls", preds, refs)
    for (p, r), a, m in zip(cases, got_anls, got_monkey):
        assert a == pytest.approx(_reference_anls(p, r)), (p, r)
        assert m == pytest.approx(_reference_monkey_anls(p, r)), (p, r)
    # Not a vacuous comparison: scores on both sides of the threshold occur.
    assert any(0 < a < 1 for a in got_anls) and any(a == 0 for a in got_anls)


# --- relaxed accuracy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gt, monkey, corrected",
    [
        ("95", "100", 0.0, 1.0),  # 5/95 > 5% of the prediction, = 5% of the ground truth
        ("105.2", "100", 1.0, 0.0),  # 5.2/105.2 < 5%, 5.2/100 > 5%
        ("104.9", "100", 1.0, 1.0),
        ("94.9", "100", 0.0, 0.0),
        ("0.0", "0", 0.0, 1.0),  # zero prediction: Monkey compares strings
        ("0", "0", 1.0, 1.0),
        ("0.01", "0", 0.0, 0.0),
        ("0", "0.001", 0.0, 0.0),
        ("0.05", "5%", 1.0, 1.0),
        ("yes", "Yes", 1.0, 1.0),
        ("dog", "the dog", 0.0, 1.0),
        ("1000", "1,000", 0.0, 1.0),
        (" 12 ", "12", 1.0, 1.0),
    ],
)
def test_relaxed_accuracy(pred, gt, monkey, corrected):
    assert both(monkey_relaxed_accuracy, relaxed_accuracy, pred, gt) == (monkey, corrected)


def test_relaxed_any_reference_counts():
    assert relaxed_accuracy(["50"], [["10", "49"]]) == 1.0
    assert monkey_relaxed_accuracy(["50"], [["10", "49"]]) == 1.0


# --- containment, GQA, exact match ----------------------------------------------------------


def test_contains_accuracy_quirks():
    assert monkey_contains_accuracy(["The answer is 35."], ["35"]) == 1.0
    assert monkey_contains_accuracy(["3.5"], ["35"]) == 1.0  # periods removed from the prediction
    assert monkey_contains_accuracy(["3.5"], ["3.5"]) == 0.0  # ... but not from the ground truth
    assert monkey_contains_accuracy(["anything"], [""]) == 1.0
    assert exact_match(["3.5"], ["35"]) == 0.0
    assert exact_match(["3.5"], ["3.5"]) == 1.0
    assert exact_match(["The answer is 35."], ["35"]) == 0.0


@pytest.mark.parametrize(
    "response, cleaned",
    [
        ("The answer is a red car.", "red car"),
        ("banana split", "split"),  # "a " matched inside "banana "
        ("cup of tea", "cup"),
        ("This is the left side, I think", ""),  # "is " first matches inside "This "
        ("Yes!", "yes"),
    ],
)
def test_gqa_clean(response, cleaned):
    assert monkey_gqa_clean(response) == cleaned


def test_gqa_contains_accuracy():
    preds = ["The answer is a red car.", "This is the left side, I think"]
    assert monkey_gqa_contains_accuracy(preds, ["red", "left"]) == 0.5
    assert monkey_contains_accuracy(preds, ["red", "left"]) == 1.0


def test_exact_match_normalises_both_sides():
    assert exact_match(["Two Dogs!"], [["2 dogs"]]) == 1.0
    assert exact_match(["two cats"], [["2 dogs", "three cats"]]) == 0.0


# --- registry and validation -----------------------------------------------------------------


def test_registry_and_compute_metrics():
    assert set(METRICS) == {
        "vqa_score", "anls", "relaxed_accuracy", "exact_match", "monkey_vqa_score", "monkey_anls",
        "monkey_relaxed_accuracy", "monkey_contains_accuracy", "monkey_gqa_contains_accuracy",
        "monkey_doc_contains_accuracy",
    }  # fmt: skip
    preds = ["95", "cat"]
    refs = ["100", ["cat", "kitten"]]
    names = ["relaxed_accuracy", "monkey_relaxed_accuracy", "exact_match"]
    out = compute_metrics(names, preds, refs)
    assert list(out) == names
    assert out == {"relaxed_accuracy": 1.0, "monkey_relaxed_accuracy": 0.5, "exact_match": 0.5}
    assert sample_scores("relaxed_accuracy", preds, refs) == [1.0, 1.0]


def test_validation_errors():
    with pytest.raises(KeyError, match="known: anls"):
        compute_metrics(["bleu"], ["a"], ["a"])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        exact_match(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no samples"):
        anls([], [])
    with pytest.raises(ValueError, match="sample 1: references are empty"):
        vqa_score(["a", "b"], ["a", []])
    with pytest.raises(TypeError, match="sample 0: prediction"):
        exact_match([None], ["a"])


def test_doc_contains_accuracy_deletes_grounding_spans_and_keeps_periods():
    # The span and its content go (so a reference inside a box does not count) ...
    assert monkey_doc_contains_accuracy(["Total: <box>(1,2),(3,4)</box> 35"], ["  35 "]) == 1.0
    assert monkey_doc_contains_accuracy(["<point>(5,6)</point> nothing"], ["(5,6)"]) == 0.0
    # ... non-greedily: text between two spans stays,
    assert monkey_doc_contains_accuracy(["<box>a</box> Invoice <box>b</box>"], ["invoice"]) == 1.0
    # but a span never runs across a line break.
    assert monkey_doc_contains_accuracy(["<box>a\nINVOICE</box>"], ["invoice"]) == 1.0
    # Periods are kept, unlike monkey_contains_accuracy.
    assert monkey_doc_contains_accuracy(["3.5"], ["35"]) == 0.0
    assert monkey_contains_accuracy(["3.5"], ["35"]) == 1.0
    assert monkey_doc_contains_accuracy(["a", "Dr. Who"], [["x", "b"], "dr. who"]) == 0.5
