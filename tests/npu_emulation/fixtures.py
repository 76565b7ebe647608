"""pytest fixtures installing the torch_npu emulation (import them into a test module to use them)."""
from __future__ import annotations

import contextlib

import pytest

from . import installed, make_module


@pytest.fixture
def npu_emulation():
    """The default emulated torch_npu (every operator, torch_npu 2.7.1), installed for one test."""
    with installed(make_module()) as mod:
        yield mod


@pytest.fixture
def npu_emulation_factory():
    """Install a custom stand-in: ``npu_emulation_factory(version=..., without=(...))``."""
    with contextlib.ExitStack() as stack:
        def install(**kw):
            return stack.enter_context(installed(make_module(**kw)))
        yield install
