"""Launch one process per rank for the gloo/NCCL tests and collect each rank's JSON results.

Not collected as tests (no ``test_`` prefix). Each rank's command line is ``argv(rank)``; a rank writes
``rank{r}.json`` into ``tmp``; stdout/stderr go to ``log{r}.txt`` and are quoted when a rank fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


def launch_ranks(argv: Callable[[int], Sequence[str]], world: int, tmp: Path, timeout_s: float,
                 what: str = "workers") -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(tmp / f"log{r}.txt", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, *argv(r)], stdout=logs[r], stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        raise AssertionError(f"{what} did not finish within {timeout_s}s:\n" + log_tails(tmp, world))
    finally:
        for f in logs:
            f.close()
    out = []
    for r in range(world):
        path = tmp / f"rank{r}.json"
        if not path.exists():
            raise AssertionError(f"rank {r} wrote no results (exit {procs[r].returncode}):\n" + log_tails(tmp, world))
        out.append(json.loads(path.read_text()))
    return out


def log_tails(tmp: Path, world: int) -> str:
    return "\n".join(f"--- rank {r}:\n" + (tmp / f"log{r}.txt").read_text()[-3000:] for r in range(world))
