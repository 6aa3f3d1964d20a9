"""Run by the distributed test under ``accelerate launch``: train, then dump this rank's weights.

Usage: ddp_worker.py CONFIG.yaml OUT_DIR
"""

import sys
from pathlib import Path

import torch

from monkeytune.train.config_load import load_config
from monkeytune.train.loop import train

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg_path, out = sys.argv[1], Path(sys.argv[2])
    result = train(load_config(cfg_path))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = {n: p.detach().clone() for n, p in result.model.named_parameters()}
    torch.save({"params": state, "losses": result.losses, "steps": result.steps}, out / f"rank{rank}.pt")
