"""Hypothesis profiles for the backend fuzzer.

``ci`` (default): about 270 cases per run, small shapes, for the CPU interpreter (~2 minutes).
``long``: >= 10,000 cases per backend and the full size ranges, for the GPU machine:
``MOJO_FUZZ_PROFILE=long pytest tests/fuzz``.
"""
import os

from hypothesis import HealthCheck, Phase, settings

_common = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# CI does not shrink by default: a failure reports its (unshrunk) example at once instead of spending
# minutes; MOJO_FUZZ_SHRINK=1/0 overrides either profile
_no_shrink = [Phase.explicit, Phase.reuse, Phase.generate]
_shrink = os.environ.get("MOJO_FUZZ_SHRINK")


def _phases(default_shrink: bool):
    on = default_shrink if _shrink is None else _shrink == "1"
    return _no_shrink + ([Phase.target, Phase.shrink] if on else [])


settings.register_profile("ci", max_examples=int(os.environ.get("MOJO_FUZZ_EXAMPLES", "24")),
                          phases=_phases(False), **_common)
settings.register_profile("long", max_examples=int(os.environ.get("MOJO_FUZZ_EXAMPLES", "10000")),
                          phases=_phases(True), **_common)
settings.load_profile(os.environ.get("MOJO_FUZZ_PROFILE", "ci"))
