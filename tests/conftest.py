"""Test-wide settings."""

import torch

# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
# extra threads mostly wait for each other. Multi-process tests set their own threads.
torch.set_num_threads(1)
