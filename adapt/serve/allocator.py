"""Process-wide allocator settings for a long-running server (the HTTP server and every Ray Serve replica)."""
from __future__ import annotations

import ctypes


def steady_malloc(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """Keep a long-running server's resident memory flat (glibc only; returns False elsewhere).

    glibc raises its mmap threshold every time a large block is freed; after that, tensors of changing sizes
    (image sizes, prompt lengths, batch sizes) come from the heap, fragment it and are never given back.
    Pinning the threshold (blocks over 1 MiB are mmapped and returned on free) and capping the arenas keeps
    the heap from growing with the mix of shapes a server sees.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_arena_max, arenas))
