"""A progress bar: tqdm when installed, else one plain line per step on stderr."""
from __future__ import annotations

import sys
import time


class _Plain:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self.t0 = time.perf_counter()

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled:
            post = getattr(self, "postfix", "")
            print(f"{self.desc} [{self.n}/{self.total}] {time.perf_counter() - self.t0:.1f}s {post}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True):
    """An object with ``update()``, ``set_postfix_str()`` and ``close()``."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _Plain(total, desc, enabled)
