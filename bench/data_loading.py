"""Data-loading benchmark: samples per second with images, 2 DataLoader workers, before and after.

"Before" is the data pipeline of the commit this branch started from (``--before``, default
the merge base with ``main``), extracted with ``git archive`` into a temporary folder; "after"
is the working tree. Both run the same worker script in fresh subprocesses, one after the other
in this one invocation, on the same synthetic data set (the ``tiny`` preset's views, real PNG
images, the trained byte-level BPE tokenizer), so the ratios compare like with like:

* ``plain``: one pass over the data set, one sample per item, batches of ``--batch``;
* ``packed``: the packing plan (token counts of every sample) and one pass over the packed
  rows (each sample is rendered for the plan and again for its row: since records stay in their
  files, no rendering is kept in memory);
* ``text plan`` and ``text rows``: the text side of ``packed`` alone, in one process: the plan's
  token counts, then each row's samples rendered.

Every record gets one more exchange of ``--extra-words`` words each way, so texts have the
length of multi-turn instruction data rather than the synthetic set's one-line captions.

Before and after alternate, ``--repeats`` passes each, and each figure is the best pass (other
processes on a shared machine slow single passes down by tens of percent). Usage:
``python bench/data_loading.py [--samples N] [--workers W] [--before REV]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, sys, time
import torch
from torch.utils.data import DataLoader
from monkeytune.config import get_config
from monkeytune.data import Collator, ConversationDataset, PackedDataset
from monkeytune.tokenizer.loading import load_tokenizer

data, tok_dir, workers, batch, repeats, max_length = sys.argv[1:7]
workers, batch, repeats, max_length = int(workers), int(batch), int(repeats), int(max_length)
torch.set_num_threads(1)
tok = load_tokenizer(tok_dir)
cfg = get_config("tiny").matched_to_tokenizer(tok)
out = {}
# The text side alone, as packing runs it: the plan's token counts ("plan"), then every row's
# samples rendered again (the old pipeline) or taken from the cache (the new one) ("rows").
# No image is opened.
best = {"plan": None, "rows": None}
for _ in range(repeats):
    t0 = time.perf_counter()
    ds = ConversationDataset(data, tok, cfg, max_length=max_length)
    packed = PackedDataset(ds, shuffle=False)
    t1 = time.perf_counter()
    render = getattr(ds, "prepare", None) or ds.encode
    for row in packed.rows:
        for i in row:
            render(i)
    t2 = time.perf_counter()
    for key, dt in (("plan", t1 - t0), ("rows", t2 - t1)):
        best[key] = dt if best[key] is None else min(best[key], dt)
for key, dt in best.items():
    out["text " + key] = {"seconds": dt, "samples": len(ds), "views": 0, "samples_per_s": len(ds) / dt}
for mode in ("plain", "packed"):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        ds = ConversationDataset(data, tok, cfg, max_length=max_length)
        if mode == "packed":
            ds = PackedDataset(ds, shuffle=False)
        loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=Collator(tok.pad_id))
        n = views = 0
        for b in loader:
            n += b["num_samples"]
            views += b["pixel_values"].shape[0]
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, n, views)
    out[mode] = {"seconds": best[0], "samples": best[1], "views": best[2], "samples_per_s": best[1] / best[0]}
print(json.dumps(out))
'''


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _extract(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, stdout=f)
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    return into / "src"


def _lengthen(data: Path, words: int) -> None:
    """Give every record a further text exchange of about ``words`` words each way, as the
    multi-turn conversations of public instruction sets have (the synthetic ones are short)."""
    import random

    rng = random.Random(0)
    vocab = "the a circle square red blue green shape colour image left right top bottom of in is".split()
    lines = []
    for raw in data.read_text().splitlines():
        rec = json.loads(raw)
        for role in ("user", "assistant"):
            rec["conversations"].append({"from": role, "value": " ".join(rng.choice(vocab) for _ in range(words))})
        lines.append(json.dumps(rec))
    data.write_text("\n".join(lines) + "\n")


def _run(src: Path, args: argparse.Namespace, data: Path, tok: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", WORKER, str(data), str(tok), str(args.workers), str(args.batch),
           "1", str(args.max_length)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"worker failed for {src}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--extra-words", type=int, default=300, help="words per extra user/assistant turn")
    p.add_argument("--before", default=None, help="git revision of the 'before' pipeline (default: merge base with main)")
    args = p.parse_args()
    before = args.before or _git("merge-base", "HEAD", "main")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(ROOT / "src"))
        from monkeytune.train.synthetic import write_synthetic_dataset

        data = tmp / "data" / "train.jsonl"
        tok = write_synthetic_dataset(data, args.samples, seed=0, image_size=args.image_size)
        _lengthen(data, args.extra_words)
        old_src = _extract(before, tmp / "before")
        # Alternate before and after so that load from other processes on a shared machine
        # hits both alike; keep the best pass of each.
        results: dict = {}
        for _ in range(args.repeats):
            for name, src in (("before", old_src), ("after", ROOT / "src")):
                run = _run(src, args, data, tok)
                for mode, fig in run.items():
                    best = results.setdefault(name, {}).get(mode)
                    if best is None or fig["samples_per_s"] > best["samples_per_s"]:
                        results[name][mode] = fig
    print(f"data loading, {args.samples} samples ({args.image_size}-pixel images, tiny preset views, "
          f"+{2 * args.extra_words} words of text), "
          f"{args.workers} workers, batches of {args.batch}; before = {before[:10]}")
    print(f"{'mode':<10} {'before samples/s':>17} {'after samples/s':>16} {'after/before':>13}")
    ratios = {}
    for mode in ("text plan", "text rows", "plain", "packed"):
        b, a = results["before"][mode]["samples_per_s"], results["after"][mode]["samples_per_s"]
        ratios[mode] = a / b
        print(f"{mode:<10} {b:>17.1f} {a:>16.1f} {a / b:>12.2f}x")
    print(json.dumps({"before_rev": before, "args": vars(args), "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
