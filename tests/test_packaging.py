"""The set-up files agree with each other and admit the torch builds this project is tested with; the wheel and
the sdist hold what an installed package needs (the notebooks ``gmmseg reproduce`` runs) and the sdist the whole
source tree."""

import ast
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from gmmseg_core.profiles import NOTEBOOKS

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


def test_version_range_admits_the_local_torch_build():
    assert _pyproject_requirements()["torch"].specifier.contains("2.14.1")


def _requirements(group: str) -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = project["dependencies"] if group == "core" else project["optional-dependencies"][group]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


@pytest.mark.parametrize("group, name, lacking, first", [
    ("core", "torch", "2.2.2", "2.3.0"),                      # torch.amp.GradScaler (train)
    ("zoo", "segmentation-models-pytorch", "0.3.4", "0.4.0"),  # smp.MODEL_ARCHITECTURES_MAPPING (the smp adapter)
    ("dev", "scikit-learn", "1.6.1", "1.7.0"),                 # GaussianMixture.lower_bounds_ (test_mixture)
    ("notebooks", "papermill", "2.5.0", "2.6.0"),              # tqdm arguments as progress_bar (reproduce)
    ("notebooks", "matplotlib", "3.8.4", "3.9.0"),             # pyplot under IPython >= 9.16 (no backend2gui)
    ("dev", "ruff", "0.12.12", "0.13.0"),                      # make lint passes (UP038 gone)
])
def test_ranges_exclude_releases_without_an_api_the_code_uses(group, name, lacking, first):
    spec = _requirements(group)[name].specifier
    assert not spec.contains(lacking) and spec.contains(first)


# import name of each distribution whose name differs from it
IMPORT_NAMES = {"scikit-learn": "sklearn", "scikit-image": "skimage", "pillow": "PIL", "pot": "ot",
                "pyyaml": "yaml"}


def _imported_top_level_modules(*folders: Path) -> set[str]:
    """Top-level modules the Python files under ``folders`` import (``pytest.importorskip("x")`` included)."""
    names = set()
    for path in (p for folder in folders for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value.split(".")[0])
    return names


def _unused(requirements, imported: set[str]) -> list[str]:
    return [name for name in requirements if IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported]


def test_every_core_dependency_is_imported_by_the_package():
    assert _unused(_requirements("core"), _imported_top_level_modules(ROOT / "gmmseg_core")) == []


def test_every_dev_dependency_is_used_by_the_tests_or_benchmarks():
    imported = _imported_top_level_modules(ROOT / "tests", ROOT / "benchmarks")
    tools = {"ruff"}                                          # run by make lint, not imported
    assert _unused(_requirements("dev").keys() - tools, imported) == []


def test_pyproject_version_is_the_package_version():
    # config.json records gmmseg_core.__version__, gmmseg --version the installed metadata: the two must agree
    import gmmseg_core

    assert _pyproject()["project"]["version"] == gmmseg_core.__version__


def test_console_script_points_at_the_cli():
    assert _pyproject()["project"]["scripts"]["gmmseg"] == "gmmseg_core.cli:main"


def test_makefile_and_ci_use_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("test:", "reproduce:"):
        assert target in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make reproduce" in readme and "make test" in readme


# -- the distributions -------------------------------------------------------------------------------------------

GENERATED_SDIST_FILES = {"PKG-INFO", "setup.cfg"}


def _source_files() -> tuple[set[str], set[str]]:
    """(tracked, present): the files git tracks, and those plus the untracked ones it does not ignore, all present
    on disk, relative to the checkout."""
    def ls(*flags):
        try:
            out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *flags], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("needs the git checkout")
        return {f for f in out.stdout.decode().split("\0") if f and (ROOT / f).is_file()}

    tracked = ls("--cached")
    return tracked, tracked | ls("--others", "--exclude-standard")


def _build(kind: str, source: Path, out: Path) -> Path:
    """Build a ``"wheel"`` or an ``"sdist"`` of ``source`` into ``out`` with this environment's setuptools
    (no isolated build environment: no download, about a second)."""
    out.mkdir()
    code = "import sys, setuptools.build_meta as backend; getattr(backend, 'build_' + sys.argv[1])(sys.argv[2])"
    done = subprocess.run([sys.executable, "-c", code, kind, str(out)], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.iterdir()
    return built


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist of a copy of the source tree, a wheel of that copy and a wheel of the unpacked sdist (as pip
    builds one to install an sdist): ``{"sdist", "wheel", "wheel_from_sdist"}`` paths, plus the file sets
    ``"tracked"`` and ``"present"`` of :func:`_source_files`."""
    pytest.importorskip("setuptools", minversion="77")     # the version pyproject.toml's build-system asks for
    tracked, present = _source_files()
    tmp = tmp_path_factory.mktemp("dists")
    source = tmp / "source"
    for rel in present:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, source / rel)
    (source / "figures" / "stray.png.tmp").write_bytes(b"\x89PNG")   # left by a run killed while saving a figure
    sdist = _build("sdist", source, tmp / "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    return {"sdist": sdist, "wheel": _build("wheel", source, tmp / "wheel"),
            "wheel_from_sdist": _build("wheel", unpacked, tmp / "wheel_from_sdist"),
            "tracked": tracked, "present": present}


@pytest.mark.parametrize("which", ["wheel", "wheel_from_sdist"])
def test_wheel_holds_the_package_and_its_notebooks_only(dists, which):
    with zipfile.ZipFile(dists[which]) as whl:
        names = {n for n in whl.namelist() if ".dist-info/" not in n}
    modules = {f for f in dists["tracked"] if f.startswith("gmmseg_core/") and f.endswith(".py")}
    notebooks = {f"gmmseg_core/notebooks/{name}.ipynb" for name in NOTEBOOKS}
    assert names == modules | notebooks


def test_installed_wheel_runs_its_own_notebooks(dists, tmp_path):
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(dists["wheel_from_sdist"]) as whl:
        whl.extractall(site)
    # the wheel's reproduce.py, as it runs from site-packages (its relative imports reach this checkout's package)
    spec = importlib.util.spec_from_file_location("gmmseg_core._installed_reproduce",
                                                  site / "gmmseg_core" / "reproduce.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.NOTEBOOK_DIR.is_relative_to(site)
    for name in NOTEBOOKS:
        shipped = installed.NOTEBOOK_DIR / f"{name}.ipynb"
        assert shipped.read_bytes() == (ROOT / "notebooks" / f"{name}.ipynb").read_bytes(), name


def test_sdist_is_the_source_tree_with_what_its_tests_need(dists):
    with tarfile.open(dists["sdist"]) as tar:
        top = tar.getnames()[0].split("/")[0]
        files = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    files = {f for f in files if not f.startswith("gmmseg.egg-info/")} - GENERATED_SDIST_FILES
    assert top.startswith("gmmseg-")
    assert dists["tracked"] - {".gitignore"} <= files
    assert files <= dists["present"]
    assert {"tests/conftest.py", "environment.yml", "Makefile", ".ci/run"} <= files
    assert not [f for f in files if f.endswith(".tmp")]


def test_git_ignores_what_a_killed_write_leaves_behind():
    for path in ("figures/01_calibration.png.tmp", "benchmarks/RESULTS.md.tmp"):
        try:
            done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
        except OSError:
            pytest.skip("needs git")
        assert done.returncode == 0, f"{path} is not ignored"


def test_reproduce_names_notebooks_missing_from_an_installation(tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    from gmmseg_core import reproduce as reproduce_module

    monkeypatch.setattr(reproduce_module, "NOTEBOOK_DIR", tmp_path / "notebooks")
    with pytest.raises(FileNotFoundError, match=r"01_discriminative_vs_generative\.ipynb.* are not in .*notebooks"):
        reproduce_module.reproduce("smoke", out_dir=tmp_path / "out", log=lambda *a, **k: None)
    assert not (tmp_path / "out").exists()
