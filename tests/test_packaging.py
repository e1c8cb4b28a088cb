"""The set-up files agree with each other and admit the torch builds this project is tested with."""

from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs.extend(extra)
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def _conda_pip_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = [r for r in pip_section if not r.startswith("-e")]
    return env, pip_section, {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    ours = _pyproject_requirements()
    _, _, conda = _conda_pip_requirements()
    assert sorted(conda) == sorted(ours)
    for name, req in ours.items():
        assert conda[name].specifier == req.specifier, name


def test_environment_yml_installs_the_package_with_every_extra():
    env, pip_section, _ = _conda_pip_requirements()
    extras = set(_pyproject()["project"]["optional-dependencies"])
    editable = [r for r in pip_section if r.startswith("-e")]
    assert len(editable) == 1
    installed_extras = set(editable[0].split("[", 1)[1].rstrip("]").split(","))
    assert installed_extras == extras
    assert "python=3.11" in env["dependencies"]


@pytest.mark.parametrize("name, version", [("torch", "2.14.1"), ("torchvision", "0.29.1")])
def test_version_ranges_admit_the_local_torch_builds(name, version):
    assert _pyproject_requirements()[name].specifier.contains(version)


def test_console_script_points_at_the_cli():
    assert _pyproject()["project"]["scripts"]["gmmseg"] == "gmmseg_core.cli:main"


def test_makefile_and_ci_use_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test:", "reproduce:"):
        assert target in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme
