"""Data at scale: the time to the first batch and the memory of the training dataset, by size and format.

LLaVA-format records (one image each, 8 distinct PNGs, a question and a 20-word answer) are
written at each size as a JSON list (the layout LLaVA ships), as JSON Lines, and as parquet with
the PNG bytes inside (``datasets.Image`` cells, written by ``monkeytune data convert``). For
each size and format, a fresh process builds the training dataset as ``monkeytune train`` does
(parse every record, render and check every sample, then collate the first batch) and reports:

* ``first_batch_s``: seconds from the start of reading to the first collated batch;
* ``peak_rss_mb`` and ``rss_mb``: the process's peak resident memory (``VmHWM``) and what it
  holds with the dataset ready (``VmRSS``), and their growth per record over the smallest size.

"before" is the code of the branch point (``--before``, default the merge base with ``main``,
extracted with ``git archive``), "after" the working tree, in the same invocation. The
branch point cannot read parquet, and its JSON-list reader counts lines from the start for every
record: a run over ``--cap`` seconds is stopped and reported as such. Usage:
``python bench/data_scale.py [--sizes 10000,100000] [--cap 600]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from data_loading import _extract, _git  # noqa: E402 - the branch point's code, as that benchmark takes it

WORKER = r'''
import json, sys, time
import torch
from monkeytune.config import get_config
from monkeytune.data import Collator, ConversationDataset
from monkeytune.tokenizer.loading import load_tokenizer

data, tok_dir = sys.argv[1:3]
torch.set_num_threads(1)
tok = load_tokenizer(tok_dir)
cfg = get_config("tiny").matched_to_tokenizer(tok)
t0 = time.perf_counter()
ds = ConversationDataset(data, tok, cfg, max_length=512)
for i in range(len(ds)):  # what training does before its first step: render and stat every sample
    ds.scan(i)
batch = Collator(tok.pad_id)([ds[i] for i in range(8)])
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss would start from the parent's at the fork); VmRSS:
# what it holds now, with the dataset ready (the peak also counts what reading held for a while).
status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("Vm")}
print(json.dumps({"records": len(ds), "first_batch_s": seconds, "peak_rss_mb": status["VmHWM"] / 1024,
                  "rss_mb": status["VmRSS"] / 1024}))
'''


def write_llava(folder: Path, n: int) -> tuple[Path, Path]:
    """``n`` LLaVA records as a JSON list and as JSON Lines (8 PNGs beside them)."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (64, 48), (30 * k, 200 - 20 * k, 90)).save(folder / "img" / f"{k}.png")
    words = "the a circle square red blue green shape colour image left right top bottom".split()
    records = [{"id": str(i), "image": f"img/{i % 8}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": " ".join(words[(i + j) % len(words)] for j in range(20))}]} for i in range(n)]
    as_list, as_lines = folder / "train.json", folder / "train.jsonl"
    as_list.write_text(json.dumps(records, indent=1))
    as_lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    return as_list, as_lines


def _run(src: Path, data: Path, tok: Path, cap: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    try:
        res = subprocess.run([sys.executable, "-c", WORKER, str(data), str(tok)], env=env, capture_output=True,
                             text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"status": f"not finished in {cap:g} s"}
    if res.returncode != 0:
        return {"status": "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return {"status": "ok", **json.loads(res.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="record counts, comma-separated")
    p.add_argument("--cap", type=float, default=600.0, help="seconds a run may take before it is stopped")
    p.add_argument("--before", default=None, help="git revision of the 'before' code (default: merge base with main)")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    before = args.before or _git("merge-base", "HEAD", "main")
    sys.path.insert(0, str(ROOT / "src"))
    from monkeytune.data.convert import convert_file
    from monkeytune.train.synthetic import write_synthetic_dataset

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = write_synthetic_dataset(tmp / "tok" / "train.jsonl", 16, seed=0, image_size=32)
        old_src = _extract(before, tmp / "before")
        print(f"{'records':>8} {'format':<8} {'code':<7} {'first batch s':>14} {'peak RSS MB':>12} {'RSS MB':>7}  status",
              flush=True)
        for n in sizes:
            folder = tmp / f"n{n}"
            as_list, as_lines = write_llava(folder, n)
            parquet = folder / "train.parquet"
            convert_file(as_lines, parquet, [])
            for fmt, data in (("json", as_list), ("jsonl", as_lines), ("parquet", parquet)):
                for code, src in (("before", old_src), ("after", ROOT / "src")):
                    r = _run(src, data, tok, args.cap)
                    results.setdefault(str(n), {}).setdefault(fmt, {})[code] = r
                    print(f"{n:>8} {fmt:<8} {code:<7} {r.get('first_batch_s', float('nan')):>14.1f} "
                          f"{r.get('peak_rss_mb', float('nan')):>12.0f} {r.get('rss_mb', float('nan')):>7.0f}  "
                          f"{r['status']}", flush=True)
    small = str(sizes[0])
    for n in map(str, sizes[1:]):
        for fmt, runs in results[n].items():
            for code, r in runs.items():
                base = results[small][fmt][code]
                if r["status"] == "ok" and base["status"] == "ok":
                    for key in ("peak_rss_mb", "rss_mb"):
                        if key in r and key in base:
                            r[f"per_record_b ({key})"] = round((r[key] - base[key]) * 2**20 / (int(n) - int(small)))
    print(json.dumps({"before_rev": before, "sizes": sizes, "results": results}))


if __name__ == "__main__":
    main()
