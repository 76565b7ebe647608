"""Expert parallelism equals EP=1 (forward and gradients): gloo on CPU with 2 and 4 processes, and
NCCL with 2 GPUs.  Each suite runs in one set of worker processes (tests/distributed_worker.py);
every scenario here reports what the workers measured for it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_worker import scenario_names
from rank_launcher import launch_ranks

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
    return launch_ranks(lambda r: [str(WORKER), suite, str(r), str(world), str(tmp / "init"), str(tmp)],
                        world, tmp, LAUNCH_TIMEOUT_S, f"{suite} workers")


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

