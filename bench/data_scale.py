"""Data at scale: start-up time, per-rank and per-worker memory, and loading throughput, by size and format.

LLaVA-format records (one image each, 8 distinct 64x48 PNGs, a question and a 20-word answer)
are written at each size (default 10k, 100k and 1M, plus a 1k baseline for the memory bound) as
a JSON list (the layout LLaVA ships, streamed to the file), as JSON Lines, and as parquet with the
PNG bytes inside (``datasets.Image`` cells, row group by row group with pyarrow; at the baseline
size the file is checked to equal what ``monkeytune data convert`` writes). For each size and
format, a fresh process builds the training dataset as ``monkeytune train`` does (parse every
record, then the start-up scan: render and stat every sample) and loads batches of ``--batch``
through a real ``DataLoader`` with ``--workers`` worker processes (the training sampler,
shuffled, and the ``Collator``; every image decoded into its views, no view cache). Reported:

* ``first_batch_s``: seconds from the start of reading to the first batch out of the DataLoader;
* ``main_peak_mb`` / ``main_rss_mb``: the main process's (one rank's) peak resident memory
  (``VmHWM``, once the ``tiny`` loading below is measured) and what it holds with the dataset
  ready, before loading (``VmRSS``);
  ``main_peak_vs_1k_mb``: the peak's growth over the 1k baseline, against the 300 MB bound;
* ``worker_peak_mb``: the largest ``VmHWM`` of a DataLoader worker (it counts the pages inherited
  from the main process at the fork) and ``worker_own_mb``, what a worker holds privately at
  the end (``Private_*`` of ``smaps_rollup``);
* ``load_per_s``: samples/s of that DataLoader over ``--load-seconds`` after a warm-up, with the
  views of the ``tiny`` and of the ``mid`` preset, each next to the consumption rate of one
  training step of that preset on this machine (forward, backward and AdamW update, timed by
  ``bench/train_step.py``): a ratio over 1 means loading keeps up with the step;
* ``json/jsonl``: the JSON list's time to the first batch over the JSON Lines'.

"before" is the code of the branch point (``--before``, default the merge base with ``main``,
which on ``main`` itself is ``HEAD``: name the branch point, e.g. ``--before 78216ac``; extracted
with ``git archive`` as ``bench/data_loading.py`` does), "now" the working tree, in the same
invocation. The training steps (the median of ``--step-repeats`` after a warm-up step; ``mid``
takes tens of seconds a step on a CPU) are timed once, before the data runs.

When the dataset takes ``cache=True`` and has ``scan_all()`` (the start-up scan saved beside the
data, keyed by its content), "now" runs twice: ``cold`` (no cache: the one pass) and ``warm``
(the cache found in place); the cache (the hidden entries that appear beside the data) and the
``datasets`` cache of the parquet file (in a temporary folder) are removed before each cold run.
Without them (the branch point), the scan is the loop over ``scan(i)`` that training runs.

The branch point cannot read parquet ("not supported"), and its JSON-list reader takes hours at
1M records: each of its runs is stopped after ``--cap`` seconds (one value, or one per size) and
reported as such; "now" runs get ``--now-cap``. Usage::

    python bench/data_scale.py [--sizes 10000,100000,1000000] [--cap 600[,600,300]] [--before REV]
                               [--formats jsonl,parquet] [--no-before] [--no-step]

Each run prints its row as it finishes; the table follows, and the last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from data_loading import _extract, _git  # noqa: E402 - the branch point's code, as that benchmark takes it

BASELINE = 1000  # records of the run the memory bound compares with
MEMORY_BOUND_MB = 300
JSON_LIST_BOUND = 3.0  # a JSON list within this factor of JSON Lines (issue: at 100k records)
PRESETS = ("tiny", "mid")

WORKER = r'''
import inspect, json, os, sys, time
import torch
from monkeytune.config import get_config
from monkeytune.data import Collator, ConversationDataset
from monkeytune.tokenizer.loading import load_tokenizer

data, tok_dir = sys.argv[1:3]
batch, workers, max_length = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
load_seconds, presets = float(sys.argv[6]), sys.argv[7].split(",")
torch.set_num_threads(1)


def status(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith("Vm")}


def children():
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def private_mb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(l.split()[1]) for l in f if l.startswith("Private_")) / 1024
    except OSError:
        return float("nan")


def emit(**fields):
    print(json.dumps(fields), flush=True)


def loader(ds, collate):
    """Batches as training draws them: the shuffled training sampler, a DataLoader of `workers`."""
    try:
        from monkeytune.train.sampler import EpochBatchSampler, Position, micro_batches
    except ImportError:
        from torch.utils.data import DataLoader
        return ((None, b) for _ in iter(int, 1) for b in DataLoader(ds, batch_size=batch, shuffle=True,
                                                                      num_workers=workers, collate_fn=collate))
    return micro_batches(ds, EpochBatchSampler(len(ds), batch, seed=0), collate, Position(), num_workers=workers)


def measure(ds, collate, t0=None):
    """(first batch s from t0, samples/s over load_seconds after a warm-up, worker peak, worker own)."""
    stream = loader(ds, collate)
    warm = max(workers, 1)  # past the first round (the workers start together), then timed
    first = None
    n = k = 0
    peak = own = 0.0
    start = None
    for k, (_, b) in enumerate(stream):
        if first is None:
            first = time.perf_counter() - (t0 if t0 is not None else 0.0)
        pids = children()
        for pid in pids:
            try:
                peak = max(peak, status(pid)["VmHWM"])
            except (OSError, KeyError):
                pass  # a worker that just ended (a new epoch starts new ones)
        if k == warm:
            start = time.perf_counter()
        elif start is not None:
            n += b["num_samples"]
            if time.perf_counter() - start >= load_seconds:
                own = max((private_mb(p) for p in pids), default=float("nan"))
                break
    seconds = time.perf_counter() - start
    stream.close()  # the epoch's DataLoader iterator goes, and its workers with it
    return first, n / seconds, peak, own, n


tok = load_tokenizer(tok_dir)
cfg = get_config(presets[0]).matched_to_tokenizer(tok)
params = inspect.signature(ConversationDataset).parameters
kwargs = {"cache": True} if "cache" in params else {}
t0 = time.perf_counter()
ds = ConversationDataset(data, tok, cfg, max_length=max_length, **kwargs)
t_built = time.perf_counter() - t0
if hasattr(ds, "scan_all"):  # the start-up scan, saved beside the data or loaded from there
    scan, scan_result = "scan_all", ds.scan_all()
else:  # what training does before its first step: render and stat every sample
    scan, scan_result = "scan loop", None
    for i in range(len(ds)):
        ds.scan(i)
t_ready = time.perf_counter() - t0
ready = status()
collate = Collator(tok.pad_id)
first, rate, wpeak, wown, n = measure(ds, collate, t0)
emit(records=len(ds), scan=scan, cache_kwarg="cache" in kwargs,
     scan_result=scan_result if isinstance(scan_result, (bool, int, float, str, type(None))) else repr(scan_result)[:200],
     build_s=t_built, ready_s=t_ready, first_batch_s=first, main_rss_mb=ready["VmRSS"], main_ready_peak_mb=ready["VmHWM"],
     main_peak_mb=status()["VmHWM"], load={presets[0]: {"samples_per_s": rate, "samples": n, "worker_peak_mb": wpeak,
                                                        "worker_own_mb": wown}})
for preset in presets[1:]:
    # The same records with this preset's views (window size): built again (no scan: loading
    # alone is measured), once the figures above are taken.
    t1 = time.perf_counter()
    other = ConversationDataset(data, tok, get_config(preset).matched_to_tokenizer(tok), max_length=max_length)
    built = time.perf_counter() - t1
    _, rate, wpeak, wown, n = measure(other, collate)
    emit(load={preset: {"samples_per_s": rate, "samples": n, "worker_peak_mb": wpeak, "worker_own_mb": wown,
                        "build_s": built}})
    del other
'''


# -- data --------------------------------------------------------------------------------------


WORDS = "the a circle square red blue green shape colour image left right top bottom".split()
QUESTION = "<image>\nDescribe the image."


def _record(i: int) -> dict:
    return {"id": str(i), "image": f"img/{i % 8}.png", "conversations": [
        {"from": "human", "value": QUESTION},
        {"from": "gpt", "value": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20))}]}


def write_llava(folder: Path, n: int) -> tuple[Path, Path]:
    """``n`` LLaVA records as a JSON list (indented, as LLaVA ships it) and as JSON Lines, 8 PNGs
    beside them; written record by record, so time and memory stay linear."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(8):
        Image.new("RGB", (64, 48), (30 * k, 200 - 20 * k, 90)).save(folder / "img" / f"{k}.png")
    as_list, as_lines = folder / "train.json", folder / "train.jsonl"
    with open(as_list, "w", encoding="utf-8") as fl, open(as_lines, "w", encoding="utf-8") as fj:
        fl.write("[\n")
        for i in range(n):
            r = _record(i)
            # json.dumps(records, indent=1) of the whole list, one record at a time
            fl.write((",\n " if i else " ") + json.dumps(r, indent=1).replace("\n", "\n "))
            fj.write(json.dumps(r) + "\n")
        fl.write("\n]")
    return as_list, as_lines


def write_parquet(folder: Path, n: int, rows_per_group: int = 10_000) -> Path:
    """The records in the sharegpt layout of ``monkeytune data convert``'s parquet (``messages``,
    ``images`` as ``datasets.Image`` cells with the PNG bytes, ``id``), written with pyarrow a row
    group at a time: at 1M records 50x faster than converting the JSON Lines."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    schema = datasets.Features({"id": datasets.Value("string"), "messages": datasets.List(turn),
                                "images": datasets.List(datasets.Image())}).arrow_schema
    png = [(folder / "img" / f"{k}.png").read_bytes() for k in range(8)]
    out = folder / "train.parquet"
    with pq.ParquetWriter(str(out), schema) as w:
        for s in range(0, n, rows_per_group):
            rows = [_record(i) for i in range(s, min(n, s + rows_per_group))]
            w.write_table(pa.Table.from_pydict({
                "id": [r["id"] for r in rows],
                "messages": [[{"role": "user", "content": QUESTION},
                              {"role": "assistant", "content": r["conversations"][1]["value"]}] for r in rows],
                "images": [[{"bytes": png[int(r["id"]) % 8], "path": None}] for r in rows],
            }, schema=schema))
    return out


def _check_parquet_layout(as_lines: Path, parquet: Path) -> None:
    """The direct writer writes what ``monkeytune data convert`` writes from the JSON Lines."""
    import pyarrow.parquet as pq
    from monkeytune.data.convert import convert_file

    ref = parquet.with_name(".convert-check.parquet")
    convert_file(as_lines, ref, [])
    a, b = pq.read_table(parquet), pq.read_table(ref)
    ref.unlink()
    if not (a.equals(b) and a.schema.metadata == b.schema.metadata):
        raise SystemExit("bench/data_scale.py: the parquet written here differs from `monkeytune data convert`'s")


# -- runs --------------------------------------------------------------------------------------


def _hidden(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def _remove(folder: Path, names: set[str]) -> None:
    for name in names:
        p = folder / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _size_mb(p: Path) -> float:
    if p.is_file():
        return p.stat().st_size / 2**20
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) / 2**20


def _run(src: Path, data: Path, tok: Path, cap: float, args: argparse.Namespace, hf_cache: Path) -> dict:
    """One fresh process over ``data`` with the code under ``src``; stopped (its whole process
    group, DataLoader workers included) after ``cap`` seconds."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(hf_cache))
    cmd = [sys.executable, "-c", WORKER, str(data), str(tok), str(args.batch), str(args.workers),
           str(args.max_length), str(args.load_seconds), ",".join(PRESETS)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
        status = "ok" if proc.returncode == 0 else None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = f"did not finish within {cap:g} s"
    r: dict = {"wall_s": round(time.perf_counter() - start, 1)}
    for line in out.splitlines():
        try:
            part = json.loads(line)
        except json.JSONDecodeError:
            continue
        load = part.pop("load", {})
        r.update(part)
        r.setdefault("load", {}).update(load)
    if status is None:
        status = "failed: " + (err.strip().splitlines() or ["?"])[-1][:200]
    elif status == "ok" and set(r.get("load", {})) != set(PRESETS):
        status = "failed: incomplete output"
    if status.startswith("did not") and "first_batch_s" in r:  # the start-up finished, loading did not
        missing = [p for p in PRESETS if p not in r.get("load", {})]
        status += f" (loading {', '.join(missing)} not measured)"
    r["status"] = status
    return r


def _step_rates(args: argparse.Namespace) -> dict:
    """Samples/s of one training step per preset, as ``bench/train_step.py`` times it (CPU, fp32)."""
    import torch
    from train_step import run_child

    common = ["--device", "cpu", "--precision", "fp32", "--max-length", "4096", "--rows", str(args.step_rows),
              "--samples", "8", "--repeats", str(args.step_repeats), "--threads", "0"]
    rates = {}
    for preset in PRESETS:
        r = run_child(["step", "--preset", preset], common)
        rates[preset] = {**r, "samples_per_s": r["batch_rows"] / r["step_seconds"]}
    rates["threads"] = torch.get_num_threads()
    return rates


# -- report ------------------------------------------------------------------------------------


def _f(x, fmt: str, width: int) -> str:
    ok = isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x))
    return (format(x, fmt) if ok else "-").rjust(width)


HEADER = (f"{'records':>8} {'format':<8} {'code':<9} {'1st batch s':>11} {'main peak':>9} {'vs 1k':>6} "
          f"{'main RSS':>8} {'wkr peak':>8} {'wkr own':>7} {'tiny /s':>8} {'÷step':>6} {'mid /s':>7} "
          f"{'÷step':>6} {'json/jsonl':>10}  status")


def _row(n: int, fmt: str, code: str, r: dict, steps: dict) -> str:
    load = r.get("load", {})
    tiny, mid = load.get("tiny", {}), load.get("mid", {})

    def ratio(preset: str, fig: dict, spec: str) -> str:
        if preset not in steps or "samples_per_s" not in fig:
            return "-".rjust(6)
        return (format(fig["samples_per_s"] / steps[preset]["samples_per_s"], spec) + "x").rjust(6)

    rt, rm = ratio("tiny", tiny, ".1f"), ratio("mid", mid, ".0f")
    return (f"{n:>8} {fmt:<8} {code:<9} {_f(r.get('first_batch_s'), '.1f', 11)} {_f(r.get('main_peak_mb'), '.0f', 9)} "
            f"{_f(r.get('main_peak_vs_1k_mb'), '+.0f', 6)} {_f(r.get('main_rss_mb'), '.0f', 8)} "
            f"{_f(tiny.get('worker_peak_mb'), '.0f', 8)} {_f(tiny.get('worker_own_mb'), '.0f', 7)} "
            f"{_f(tiny.get('samples_per_s'), '.0f', 8)} {rt} {_f(mid.get('samples_per_s'), '.1f', 7)} "
            f"{rm} {_f(r.get('json_over_jsonl'), '.2f', 9)}{'x' if 'json_over_jsonl' in r else ' '}  {r['status']}")


def _caps(text: str, sizes: list[int]) -> dict[int, float]:
    """Seconds per size (``sizes`` as given); the baseline gets the smallest cap unless it is listed."""
    caps = [float(x) for x in text.split(",")]
    if len(caps) == 1:
        return {n: caps[0] for n in [BASELINE, *sizes]}
    if len(caps) != len(sizes):
        raise SystemExit(f"--cap: one value, or one per size of --sizes ({len(sizes)})")
    return {BASELINE: min(caps), **dict(zip(sizes, caps))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help=f"record counts, comma-separated (a {BASELINE}-record baseline is always run first)")
    p.add_argument("--cap", default="600", help="seconds a branch-point run may take before it is stopped: "
                   "one value, or one per size of --sizes, in its order")
    p.add_argument("--now-cap", type=float, default=3600.0, help="the same for the working tree's runs")
    p.add_argument("--before", default=None, help="git revision of the 'before' code (None: the merge base with main)")
    p.add_argument("--batch", type=int, default=8, help="samples per loaded batch")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--max-length", type=int, default=2048, help="max_length of the dataset (mid: 1280 image tokens)")
    p.add_argument("--load-seconds", type=float, default=5.0, help="seconds of loading measured per preset")
    p.add_argument("--step-rows", type=int, default=2, help="rows of the timed training step")
    p.add_argument("--step-repeats", type=int, default=3, help="timed training steps per preset (median)")
    p.add_argument("--no-step", action="store_true", help="skip timing the training steps (no ÷step ratios)")
    p.add_argument("--formats", default="json,jsonl,parquet", help="formats run, comma-separated")
    p.add_argument("--no-before", action="store_true", help="skip the branch point's runs")
    args = p.parse_args()
    given = [int(x) for x in args.sizes.split(",")]
    caps = _caps(args.cap, given)
    sizes = sorted(set(given) - {BASELINE})
    all_sizes = [BASELINE, *sizes]
    before = args.before or _git("merge-base", "HEAD", "main")
    sys.path.insert(0, str(ROOT / "src"))

    steps: dict = {}
    if not args.no_step:
        steps = _step_rates(args)
        print(f"training step on this CPU ({steps['threads']} threads, fp32, {args.step_rows} rows): " + ", ".join(
            f"{k} {v['step_seconds']:.2f} s = {v['samples_per_s']:.2f} samples/s" for k, v in steps.items()
            if k in PRESETS), flush=True)

    results: dict = {}
    generated: dict = {}
    caches: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from monkeytune.train.synthetic import write_synthetic_dataset

        tok = write_synthetic_dataset(tmp / "tok" / "train.jsonl", 16, seed=0, image_size=32)
        old_src = _extract(before, tmp / "before")
        old_reads_tables = (old_src / "monkeytune" / "data" / "tables.py").is_file()
        print(f"loading: batches of {args.batch}, {args.workers} workers, {args.load_seconds:g} s per preset; "
              f"before = {before[:10]}; ÷step: loading over the step's samples/s", flush=True)
        print(HEADER, flush=True)
        for n in all_sizes:
            folder = tmp / f"n{n}"
            t = time.perf_counter()
            as_list, as_lines = write_llava(folder, n)
            t_json = time.perf_counter() - t
            parquet = write_parquet(folder, n)
            t_parquet = time.perf_counter() - t - t_json
            if n == BASELINE:
                _check_parquet_layout(as_lines, parquet)
            generated[str(n)] = {"json_s": round(t_json, 1), "parquet_s": round(t_parquet, 1),
                                 "mb": {f.name: round(f.stat().st_size / 2**20, 1) for f in (as_list, as_lines, parquet)}}
            hf_cache = tmp / "hf-cache"
            baseline = _hidden(folder)
            for fmt, data in (("json", as_list), ("jsonl", as_lines), ("parquet", parquet)):
                if fmt not in args.formats.split(","):
                    continue
                runs = results.setdefault(str(n), {}).setdefault(fmt, {})
                if args.no_before:
                    runs["before"] = {"status": "not run (--no-before)"}
                elif fmt == "parquet" and not old_reads_tables:
                    runs["before"] = {"status": "not supported"}
                else:
                    runs["before"] = _run(old_src, data, tok, caps[n], args, hf_cache)
                print(_row(n, fmt, "before", runs["before"], steps), flush=True)
                _remove(folder, _hidden(folder) - baseline)
                shutil.rmtree(hf_cache, ignore_errors=True)
                runs["now cold"] = cold = _run(ROOT / "src", data, tok, args.now_cap, args, hf_cache)
                print(_row(n, fmt, "now cold", cold, steps), flush=True)
                found = _hidden(folder) - baseline
                caches.setdefault(str(n), {})[fmt] = {name: round(_size_mb(folder / name), 2) for name in sorted(found)}
                if cold.get("scan") == "scan_all" or found:
                    runs["now warm"] = warm = _run(ROOT / "src", data, tok, args.now_cap, args, hf_cache)
                    if not found and warm["status"] == "ok":
                        warm["status"] = "ok (no cache found beside the data)"
                    print(_row(n, fmt, "now warm", warm, steps), flush=True)
                _remove(folder, _hidden(folder) - baseline)
                shutil.rmtree(hf_cache, ignore_errors=True)
            shutil.rmtree(folder)  # a size's files go before the next size's are written

    # Growth over the baseline, and the JSON list against JSON Lines.
    for n in map(str, all_sizes):
        for fmt, runs in results[n].items():
            for code, r in runs.items():
                base = results[str(BASELINE)][fmt].get(code, {})
                if n != str(BASELINE) and "main_peak_mb" in r and "main_peak_mb" in base:
                    r["main_peak_vs_1k_mb"] = r["main_peak_mb"] - base["main_peak_mb"]
                    r["main_rss_vs_1k_mb"] = r["main_rss_mb"] - base["main_rss_mb"]
                    wb, wr = base.get("load", {}).get("tiny", {}), r.get("load", {}).get("tiny", {})
                    if "worker_peak_mb" in wb and "worker_peak_mb" in wr:
                        r["worker_peak_vs_1k_mb"] = wr["worker_peak_mb"] - wb["worker_peak_mb"]
                jl = results[n].get("jsonl", {}).get(code, {})
                if fmt == "json" and "first_batch_s" in r and "first_batch_s" in jl:
                    r["json_over_jsonl"] = r["first_batch_s"] / jl["first_batch_s"]

    print()
    print(f"data at scale; before = {before[:10]}, now = working tree; sizes in records; memory in MB; "
          f"loading in samples/s ({args.workers} workers, batches of {args.batch})")
    if steps:
        print("training step (" + ", ".join(f"{k}: {steps[k]['samples_per_s']:.2f} samples/s" for k in PRESETS) +
              f"; CPU, {steps['threads']} threads, fp32, {args.step_rows} rows)")
    print(HEADER)
    for n in all_sizes:
        for fmt, runs in results[str(n)].items():
            for code, r in runs.items():
                print(_row(n, fmt, code, r, steps))
    largest = str(all_sizes[-1])
    bounds = {}
    for fmt, runs in results[largest].items():
        for code, r in runs.items():
            if "main_peak_vs_1k_mb" in r:
                bounds[f"{fmt} {code}"] = round(r["main_peak_vs_1k_mb"], 1)
    if len(all_sizes) > 1:
        print(f"per-rank memory, {largest} records - {BASELINE} (main peak, bound {MEMORY_BOUND_MB} MB): " +
              ", ".join(f"{k} {v:+.0f}{'' if v <= MEMORY_BOUND_MB else ' OVER'}" for k, v in bounds.items()))
    ratios = {f"{n} {code}": round(r["json_over_jsonl"], 2) for n in map(str, all_sizes)
              for code, r in results[n].get("json", {}).items() if "json_over_jsonl" in r}
    print(f"JSON list / JSON Lines, time to the first batch (bound {JSON_LIST_BOUND:g}x at 100k): " +
          ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"before_rev": before, "sizes": all_sizes, "caps_s": {str(k): v for k, v in caps.items()},
                      "now_cap_s": args.now_cap, "args": vars(args), "step": steps, "generated": generated,
                      "caches": caches, "memory_bound_mb": MEMORY_BOUND_MB, "memory_vs_1k_mb": bounds,
                      "json_over_jsonl": ratios, "results": results}))


if __name__ == "__main__":
    main()
