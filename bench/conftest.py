import ctypes
import os

import torch

# One thread, as the targets are stated; a noisy shared machine otherwise dominates the spread.
torch.set_num_threads(int(os.environ.get("FWDLLM_BENCH_THREADS", "1")))

# Fixed mmap threshold (glibc): large buffers are returned to the OS when freed, so the resident-set
# high-water mark measures each call's own peak instead of memory the allocator kept from a previous
# call (bench/memory.py).
try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
except OSError:
    pass
