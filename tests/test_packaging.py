"""What a fresh install gets: the declared Triton range and the extras, CI testing both ends of the
range, and the README's install commands."""
import pathlib
import re

import pytest

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _extra(name):
    return {r.name: r for r in map(Requirement, _project()["project"]["optional-dependencies"][name])}


def _make_var(name):
    return re.search(rf"^{name} \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def test_license_is_an_spdx_expression():
    data = _project()
    assert data["project"]["license"] == "Apache-2.0"      # the table form is deprecated by setuptools
    (setuptools,) = [Requirement(r) for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools.specifier.contains("77.0") and not setuptools.specifier.contains("76.9")


def test_extras_give_a_working_install_for_each_use():
    triton = _extra("triton")
    assert {"triton", "numpy"} <= set(triton)              # numpy runs the Triton interpreter
    assert {"matplotlib", "tqdm"} <= set(_extra("bench"))
    dev = _extra("dev")
    assert {"pytest", "hypothesis"} <= set(dev)
    assert dev["mojo-opset"].extras == {"triton", "bench"}


def test_make_and_ci_test_both_ends_of_the_declared_triton_range():
    spec = _extra("triton")["triton"].specifier
    oldest, default, newest = (_make_var(v) for v in ("TRITON_OLDEST", "TRITON_VERSION", "TRITON_NEWEST"))
    assert all(spec.contains(v) for v in (oldest, default, newest))
    assert Version(oldest) < Version(default) <= Version(newest)
    assert not spec.contains(str(Version(oldest).major) + "." + str(Version(oldest).minor - 1))  # the lower bound
    ci = (ROOT / ".ci" / "run").read_text()
    for target in ("make test", "make compare ", "make compare-newest", "make compare-oldest"):
        assert target in ci


def test_readme_quick_start_is_two_commands_and_gpu_install_is_offline():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [ln.split()[:2] for ln in quick.strip().splitlines()] == [["make", "compare"], ["make", "test"]]
    assert "python3 -m pip install --no-build-isolation --no-deps -e ." in readme


def test_every_tuned_config_file_is_package_data():
    """A wheel must carry each GPU's tuned tables (bf16 and quantized), or installs run on heuristics."""
    pkg = ROOT / "backends" / "mojo_opset_triton"
    globs = _project()["tool"]["setuptools"]["package-data"]["mojo_opset_triton"]
    files = [p.relative_to(pkg).as_posix() for p in (pkg / "configs").rglob("*.json")]
    assert any(f.startswith("configs/quant/") for f in files)
    for f in files:
        assert any(pathlib.PurePosixPath(f).match(g) and f.count("/") == g.count("/") for g in globs), f
