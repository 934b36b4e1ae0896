"""End of a multi-process example run (``torchrun`` / ``accelerate launch``): shared by the examples and
``benchmarks/fsdp2_step.py``."""

from __future__ import annotations

import os
import sys


def leave_after_clean_run() -> None:
    """Once all work is done and written, leave a multi-process run without the interpreter teardown.

    With torch 2.13 a gloo background thread can abort a process during interpreter teardown after a clean run
    ("terminate called without an active exception", exit -6; seen in the DDP, FSDP2 and Trainer examples on CI), even
    after ``destroy_process_group()``. The process group is destroyed if still there, output is flushed, and the
    process exits with status 0 directly. One-process runs return normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
