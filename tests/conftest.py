"""Test-wide settings."""

import os
import sys

import torch

# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
# extra threads mostly wait for each other. Multi-process tests set their own threads.
torch.set_num_threads(1)

# DeepSpeed's CPU op builds live in this environment (`make install` compiles the one the engine
# tests need there), not in ~/.cache, where another checkout's build would be rebuilt (35 s).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
