"""View-cache benchmark: samples per second with and without ``data.view_cache_gib``, side by side.

The demo's digits data (each image asked about 8 times, in shuffled order) is generated into a
temporary folder and read by :class:`~monkeytune.data.ConversationDataset` with the demo model's
views (2x2 windows of 112 pixels plus the global view), in the main process, as training reads
it when ``data.num_workers`` is 0. Each setting runs ``--epochs`` passes over a shuffled order;
the cached dataset's first pass fills its cache, so the later passes show the steady state.
Cached and uncached passes alternate, and each figure is the best pass (other processes on a
shared machine slow single passes down). Usage:
``python bench/view_cache.py [--images N] [--epochs E]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from monkeytune.data import ConversationDataset
    from monkeytune.demo.generator import generate_dataset
    from monkeytune.demo.run import demo_model_config
    from monkeytune.tokenizer.loading import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="training images (8 records each)")
    parser.add_argument("--epochs", type=int, default=3, help="passes per setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(Path(tmp) / "data", task="digits", seed=0, n_train=args.images, n_val=1, n_test=1,
                                progress=False)
        tok = load_tokenizer(str(data.tokenizer))
        cfg = demo_model_config().matched_to_tokenizer(tok)
        sets = {
            "uncached": ConversationDataset(data.train, tok, cfg, max_length=256),
            "cached": ConversationDataset(data.train, tok, cfg, max_length=256, view_cache_bytes=2**31),
        }
        best = {name: [] for name in sets}
        for epoch in range(args.epochs):
            order = torch.randperm(len(sets["cached"]), generator=torch.Generator().manual_seed(epoch)).tolist()
            for name, ds in sets.items():
                start = time.perf_counter()
                for i in order:
                    ds[i]
                best[name].append(len(order) / (time.perf_counter() - start))
        samples = len(sets["cached"])
    rates = {name: max(r[1:] if len(r) > 1 else r) for name, r in best.items()}
    print(f"{samples} samples of {args.images} images, {args.epochs} passes each (best pass after the first)")
    for name, rate in rates.items():
        print(f"{name:>9}: {rate:8.1f} samples/s   passes: {', '.join(f'{r:.1f}' for r in best[name])}")
    ratio = rates["cached"] / rates["uncached"]
    print(f"cached / uncached: x{ratio:.2f}")
    print(json.dumps({"samples": samples, "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
                      "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
