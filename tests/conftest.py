"""Test-wide settings."""

import os
import sys

# Threads that wait for work sleep instead of spinning (read by OpenMP when torch loads it, and
# inherited by every process a test starts). Two pytest workers share 2 cores with the ranks
# and servers the tests start: a spinning thread takes the core that the one it waits for needs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 - after the OpenMP setting

# One intra-op thread: the tiny models gain nothing from more, and on a shared 2-core machine
# extra threads mostly wait for each other. Multi-process tests set their own threads.
torch.set_num_threads(1)

# DeepSpeed's CPU op builds live in this environment (`make install` compiles the one the engine
# tests need there), not in ~/.cache, where another checkout's build would be rebuilt (35 s).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def pytest_collection_modifyitems(items):
    """Files marked ``processes`` (they launch ranks) first, longest first; the rest in their order.

    ``make test`` runs two workers a file at a time in this order (``--dist loadfile
    --no-loadscope-reorder``): the long multi-process files start at once and the many short
    single-process files fill the other core meanwhile, instead of the run ending on one long
    file with a core idle. ``seconds`` is the file's measured time in such a run.
    """

    def cost(item) -> float:
        mark = item.get_closest_marker("processes")
        return -mark.kwargs.get("seconds", 1) if mark is not None else 0

    items.sort(key=cost)
