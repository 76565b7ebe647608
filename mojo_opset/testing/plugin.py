"""pytest plugin (auto-loaded through the ``pytest11`` entry point).

A test that takes the ``mojo_backend`` fixture runs once per backend, inside
``mo.use_backend(<name>)`` (and ``mo.strict()`` with ``--mojo-strict``)::

    def test_my_layer(mojo_backend):
        y = my_layer(x)          # every mojo_opset call in here goes to mojo_backend

    @pytest.mark.mojo_backends("triton", "ttx")
    def test_kernels_only(mojo_backend): ...

Options: ``--mojo-backends=a,b`` (default: every available backend, the torch reference included;
named but unavailable backends are skipped with their reason), ``--mojo-strict``.
Nothing heavy is imported until a test asks for the fixture.
"""
from __future__ import annotations

import contextlib

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("mojo_opset", "mojo_opset backends")
    group.addoption("--mojo-backends", default=None, metavar="IDS",
                    help="comma-separated backend ids the mojo_backend fixture runs over "
                         "(default: every available backend, torch included)")
    group.addoption("--mojo-strict", action="store_true", default=False,
                    help="run mojo_backend tests under mo.strict(): a fallback to the reference fails the test")


def pytest_configure(config):
    config.addinivalue_line("markers", "mojo_backends(*ids): run the mojo_backend fixture only over these backends")


def _params(config, only):
    import mojo_opset as mo

    avail = mo.available_backends()
    opt = config.getoption("--mojo-backends")
    names = [n.strip() for n in opt.split(",") if n.strip()] if opt else list(avail)
    unknown = [n for n in names if n not in avail]
    if unknown:
        raise pytest.UsageError(f"--mojo-backends: unknown backend(s) {', '.join(unknown)}; "
                                f"registered: {', '.join(avail)}")
    if opt is None:
        names = [n for n in names if avail[n]["available"]]
    if only:
        # a marked backend that is not selected or not available shows up as a skip with its reason
        names = [n for n in names if n in only] + [n for n in only if n not in names]
    params = []
    for n in names:
        rec = avail.get(n)
        if rec is None:
            params.append(pytest.param(n, id=n, marks=pytest.mark.skip(reason=f"backend {n!r} is not registered")))
        elif not rec["available"]:
            params.append(pytest.param(n, id=n, marks=pytest.mark.skip(
                reason=f"backend {n!r} is unavailable: {rec['reason']}")))
        else:
            params.append(pytest.param(n, id=n))
    if not params:
        params.append(pytest.param(None, id="no-backend",
                                   marks=pytest.mark.skip(reason="no selected backend is available")))
    return params


def pytest_generate_tests(metafunc):
    if "mojo_backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("mojo_backends")
    only = list(marker.args) if marker else None
    metafunc.parametrize("mojo_backend", _params(metafunc.config, only), indirect=True)


@pytest.fixture
def mojo_backend(request):
    """The backend id this test instance runs on; mojo_opset calls inside the test go to it."""
    import mojo_opset as mo

    name = getattr(request, "param", None) or "torch"
    strict = mo.strict() if request.config.getoption("--mojo-strict") else contextlib.nullcontext()
    with mo.use_backend(name), strict:
        yield name
