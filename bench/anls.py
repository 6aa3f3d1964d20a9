"""ANLS on long answers: rapidfuzz's Levenshtein (the library) versus the old pure-Python loop.

Both are timed side by side in one run on the same document-style answer pairs (a reference of
200-2000 characters and a prediction that is an edited copy of it, as a model's long transcription
would be). The pure-Python loop is kept here only as the reference the library used to run; the
scores of the two are checked to be equal before any time is reported.

Usage: ``python bench/anls.py [--quick]``. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

from monkeytune.eval.metrics import sample_scores


def python_levenshtein(a: str, b: str) -> int:
    """The edit distance as monkeytune computed it before rapidfuzz: a two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def python_anls(pred: str, refs: list[str]) -> float:
    """The ``anls`` per-sample rule with the pure-Python distance (same normalisation as the library)."""
    pred = " ".join(pred.lower().split())
    best = 0.0
    for gt in refs:
        gt = " ".join(gt.lower().split())
        length = max(len(gt), len(pred))
        d = 0.0 if length == 0 else python_levenshtein(gt, pred) / length
        if d < 0.5:
            best = max(best, 1.0 - d)
    return best


def make_pairs(n: int, lo: int, hi: int, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``n`` (prediction, [reference]) pairs with references of ``lo``..``hi`` characters."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(400)]
    preds, refs = [], []
    for _ in range(n):
        target = rng.randint(lo, hi)
        ref = ""
        while len(ref) < target:
            ref += rng.choice(words) + " "
        ref = ref[:target].strip()
        # About 10% of the characters edited: substitutions, deletions and insertions.
        pred = "".join(rng.choice(string.ascii_lowercase) if rng.random() < 0.05 else c
                       for c in ref if rng.random() > 0.03)
        pred += " " + rng.choice(words)
        preds.append(pred)
        refs.append([ref])
    return preds, refs


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter pairs (seconds, not a minute)")
    parser.add_argument("--pairs", type=int, default=8, help="answer pairs per length bucket")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of rapidfuzz; the fastest counts "
                        "(the pure-Python loop runs once: it takes seconds and varies little)")
    args = parser.parse_args()
    buckets = [(200, 500), (500, 1000), (1000, 2000)]
    n = 3 if args.quick else args.pairs
    results = []
    for lo, hi in buckets:
        preds, refs = make_pairs(n, lo, hi, seed=lo)
        ours = sample_scores("anls", preds, refs)
        plain = [python_anls(p, r) for p, r in zip(preds, refs)]
        if any(abs(a - b) > 1e-12 for a, b in zip(ours, plain)):
            raise SystemExit(f"scores differ for {lo}-{hi} characters: the comparison would be meaningless")
        t_py = best_of(lambda: [python_anls(p, r) for p, r in zip(preds, refs)], 1)
        t_rf = best_of(lambda: sample_scores("anls", preds, refs), args.repeats)
        row = {"chars": f"{lo}-{hi}", "pairs": n, "python_s": round(t_py, 4), "rapidfuzz_s": round(t_rf, 6),
               "speedup": round(t_py / t_rf, 1), "mean_anls": round(sum(ours) / n, 4)}
        results.append(row)
        print(f"{row['chars']:>10} chars, {n} pairs: pure Python {t_py * 1e3:9.1f} ms   rapidfuzz "
              f"{t_rf * 1e3:7.2f} ms   speed-up x{row['speedup']:.0f}   (mean ANLS {row['mean_anls']})")
    print(json.dumps({"bench": "anls", "results": results}))


if __name__ == "__main__":
    main()
