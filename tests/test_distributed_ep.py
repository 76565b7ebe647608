"""Expert parallelism equals EP=1 (forward and gradients): gloo on CPU with 2 and 4 processes, and
NCCL with 2 GPUs.  Each suite runs in one set of worker processes (tests/distributed_worker.py);
every scenario here reports what the workers measured for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed_worker import TIMEOUT_S, scenario_names

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT_S = 420         # a whole suite; the workers' own collectives time out after TIMEOUT_S
_cache: dict = {}


def run_suite(suite: str, world: int, tmp_path_factory) -> list[dict]:
    """Launch the suite's workers once per session; returns each rank's {scenario: result}."""
    key = (suite, world)
    if key not in _cache:
        try:
            _cache[key] = _launch(suite, world, tmp_path_factory.mktemp(f"ep_{suite}_{world}"))
        except Exception as exc:  # every scenario of the suite reports the launch failure
            _cache[key] = exc
    if isinstance(_cache[key], Exception):
        raise _cache[key]
    return _cache[key]


def _launch(suite, world, tmp: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [open(tmp / f"log{r}.txt", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), suite, str(r), str(world), str(tmp / "init"), str(tmp)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(world)]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        raise AssertionError(f"{suite} workers did not finish within {LAUNCH_TIMEOUT_S}s:\n" + _tails(tmp, world))
    finally:
        for f in logs:
            f.close()
    out = []
    for r in range(world):
        path = tmp / f"rank{r}.json"
        if not path.exists():
            raise AssertionError(f"rank {r} wrote no results (exit {procs[r].returncode}):\n" + _tails(tmp, world))
        out.append(json.loads(path.read_text()))
    return out


def _tails(tmp: Path, world: int) -> str:
    return "\n".join(f"--- rank {r}:\n" + (tmp / f"log{r}.txt").read_text()[-3000:] for r in range(world))


def check_scenario(results: list[dict], scenario: str) -> None:
    bad = {r: res.get(scenario, "not run: the worker stopped before it") for r, res in enumerate(results)}
    bad = {r: v for r, v in bad.items() if v != "ok"}
    assert not bad, "\n".join(f"rank {r}: {v}" for r, v in bad.items())


_GLOO = [(w, s) for w in (2, 4) for s in scenario_names("gloo", w)]


@pytest.mark.distributed
@pytest.mark.parametrize("world,scenario", _GLOO, ids=[f"w{w}-{s}" for w, s in _GLOO])
def test_ep_gloo(world, scenario, tmp_path_factory):
    check_scenario(run_suite("gloo", world, tmp_path_factory), scenario)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("scenario", scenario_names("nccl", 2))
def test_ep_nccl(scenario, tmp_path_factory):
    check_scenario(run_suite("nccl", 2, tmp_path_factory), scenario)

