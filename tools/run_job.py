#!/usr/bin/env python3
"""Runs (or resumes) a VAE Lab finetuning job folder, with or without ComfyUI:

    python tools/run_job.py <job folder> [--device cuda|cpu]
    torchrun --standalone --nproc_per_node 4 tools/run_job.py <job folder>      # several GPUs (README: multi-GPU)

Start Finetune Job launches this very file with ComfyUI's Python. Only the host-free ``training`` library is
imported (the pack folder goes on sys.path; ComfyUI is not involved, so its ``nodes`` is never shadowed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.jobs import main

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: tear the process group down, then os._exit
        from training.distributed import exit_rank

        exit_rank(main)
    sys.exit(main())
