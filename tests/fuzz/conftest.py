"""Hypothesis profiles for the backend fuzzer.

``ci`` (default): a few hundred cases in total, small shapes, for the CPU interpreter.
``long``: >= 10,000 cases per backend and the full size ranges, for the GPU machine:
``MOJO_FUZZ_PROFILE=long pytest tests/fuzz``.
"""
import os

from hypothesis import HealthCheck, Phase, settings

_common = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# CI does not shrink: a failure reports its (unshrunk) example at once instead of spending minutes
settings.register_profile("ci", max_examples=int(os.environ.get("MOJO_FUZZ_EXAMPLES", "40")),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.register_profile("long", max_examples=int(os.environ.get("MOJO_FUZZ_EXAMPLES", "10000")), **_common)
settings.load_profile(os.environ.get("MOJO_FUZZ_PROFILE", "ci"))
