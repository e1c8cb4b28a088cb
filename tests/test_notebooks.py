"""The study notebooks: clean sources, a well-formed parameters cell, profiles that match it, and a smoke run.

The smoke run executes every notebook once (module-scoped) through ``reproduce("smoke")`` into a temporary
directory (executed notebooks, figures, tables and the model cache all under tmp_path) and then checks the
artefacts each notebook promises.
"""

import ast
import csv
import io
import re
import tokenize

import nbformat
import numpy as np
import pytest
import torch

from gmmseg_core.profiles import (
    NOTEBOOKS,
    PROFILES,
    ExperimentRuns,
    check_list_parameters,
    check_working_directory,
    image_hw,
    size_label,
)
from gmmseg_core.reproduce import NOTEBOOK_DIR, RUN_PARAMETERS, reproduce

PATHS = {name: NOTEBOOK_DIR / f"{name}.ipynb" for name in NOTEBOOKS}

# Figures each notebook must write under the smoke profile (stable names; README links some of them).
EXPECTED_FIGURES = {
    "01_discriminative_vs_generative": ["01_decision_regions", "01_class_densities", "01_samples",
                                        "01_far_from_data", "01_calibration"],
    "02_sinkhorn_em": ["02_toy_lower_bounds", "02_toy_unbalanced", "02_epsilon_iterations", "02_real_embeddings",
                       "02_time_per_iteration"],
    "03_closed_set": ["03_closed_set_miou", "03_per_class_iou", "03_training_curves", "03_examples"],
    "04_anomaly": ["04_roc_pr", "04_score_maps", "04_anomaly_ap", "04_class_norm_ablation"],
    "05_components": ["05_component_maps", "05_vehicle_components", "05_embedding_pca", "05_bic_components",
                      "05_ablation"],
    "06_explorer": ["06_pixel_explorer", "06_threshold_masks"],
}


def _parameters(nb):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return cells


def _parameter_names(name):
    nb = nbformat.read(PATHS[name], as_version=4)
    (cell,) = _parameters(nb)
    return {node.targets[0].id for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_source_is_clean(name):
    nb = nbformat.read(PATHS[name], as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a title"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_one_parameters_cell_of_plain_literals(name):
    nb = nbformat.read(PATHS[name], as_version=4)
    cells = _parameters(nb)
    assert len(cells) == 1, f"{name}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"{name}: parameters cell may only hold `name = literal` lines, got {ast.unparse(node)!r}"
        ast.literal_eval(node.value)  # raises for anything but a plain literal
    assert set(RUN_PARAMETERS) <= _parameter_names(name), "run-wide parameters are declared"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameter_is_explained_on_its_line(name):
    (cell,) = _parameters(nbformat.read(PATHS[name], as_version=4))
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(cell.source).readline)
                 if tok.type == tokenize.COMMENT}
    bare = [node.targets[0].id for node in ast.parse(cell.source).body if node.end_lineno not in commented]
    assert not bare, f"{name}: parameters without a comment saying what they set: {bare}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_papermill_reads_every_parameter(name):
    # papermill parses the cell itself (for --help-notebook and its "unknown parameter" warnings); a comment
    # with an "=" in it makes it skip that line
    import papermill

    assert set(papermill.inspect_notebook(str(PATHS[name]))) == _parameter_names(name)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_keys_are_notebook_parameters(profile):
    for name, overrides in PROFILES[profile].items():
        unknown = set(overrides) - _parameter_names(name)
        assert not unknown, f"profile {profile!r} sets unknown parameters of {name}: {sorted(unknown)}"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    result = reproduce("smoke", out_dir=root / "out", figures_dir=root / "figures", cache_dir=root / "cache",
                       log=lambda *a, **k: None)
    return root, result


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_writes_its_figures(smoke_run, name):
    root, result = smoke_run
    assert result["notebooks"][name]["seconds"] > 0
    executed = nbformat.read(root / "out" / f"{name}.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    for fig in EXPECTED_FIGURES[name]:
        path = root / "figures" / f"{fig}.png"
        assert path.is_file() and path.stat().st_size > 1000, f"{name} did not write {path.name}"


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_cell_echoes_the_value_of_a_plotting_call(smoke_run, name):
    # a cell ending in plots.savefig(...) or ax.legend() prints "PosixPath(...)" / "<matplotlib...>" above its figure
    root, _ = smoke_run
    executed = nbformat.read(root / "out" / f"{name}.ipynb", as_version=4)
    echoed = [(c.get("id"), o["data"].get("text/plain", "")[:60]) for c in executed.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "execute_result"
              and o["data"].get("text/plain", "").lstrip("[").startswith(("PosixPath(", "<matplotlib", "Text("))]
    assert not echoed, f"{name}: cells echo a plotting call's return value: {echoed}"


@pytest.mark.notebooks
@pytest.mark.slow
def test_closed_set_table(smoke_run):
    root, _ = smoke_run
    rows = _read_csv(root / "figures" / "closed_set_table.csv")
    smoke = PROFILES["smoke"]["03_closed_set"]
    assert {r["arch"] for r in rows} == set(smoke["archs"])
    assert "scenes" in {r["dataset"] for r in rows}
    for head in ("softmax", "gmm_paper", "gmm_official"):
        for r in rows:
            assert 0.0 <= float(r[f"{head}_miou"]) <= 1.0
    md = (root / "figures" / "closed_set_table.md").read_text()
    assert "| dataset | arch | constant | softmax | GMM (paper) | GMM (official) | best |" in md


@pytest.mark.notebooks
@pytest.mark.slow
def test_anomaly_table(smoke_run):
    root, _ = smoke_run
    rows = _read_csv(root / "figures" / "anomaly_table.csv")
    assert {"scenes/anomaly", "scenes/anomaly_near"} <= {r["split"] for r in rows}
    scores = {(r["model"], r["score"]) for r in rows}
    for s in ("msp", "max_logit", "energy", "entropy", "sml"):
        assert ("softmax", s) in scores
    assert ("gmm_paper", "gmm") in scores
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0 and 0.0 <= float(r["fpr95"]) <= 1.0
    assert "AUROC" in (root / "figures" / "anomaly_table.md").read_text()


@pytest.mark.notebooks
@pytest.mark.slow
def test_class_norm_ablation_table(smoke_run):
    root, _ = smoke_run
    rows = _read_csv(root / "figures" / "anomaly_class_norm_ablation.csv")
    # four variants (paper / official, each with and without the class LayerNorm) on every scenes split
    assert {(r["variant"], r["class_norm"]) for r in rows} == {
        ("GMM (paper)", "False"), ("GMM (paper) + class LayerNorm", "True"),
        ("GMM (official)", "True"), ("GMM (official) without class LayerNorm", "False")}
    assert {r["split"] for r in rows} == {"scenes/anomaly", "scenes/anomaly_near"}
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0 and float(r["logit_spread"]) >= 0.0


def test_image_size_is_read_as_an_int_or_a_pair():
    assert (image_hw([64, 128]), image_hw((16, 8)), image_hw(32)) == ((64, 128), (16, 8), (32, 32))
    assert (size_label([64, 128]), size_label(32)) == ("64x128", "32x32")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_notebook_indexes_image_size(name):
    # ExperimentRuns accepts an int (a square) as well as [height, width]; image_size[0] fails on the int
    # (profiles.image_hw reads both)
    code = "\n".join(c.source for c in nbformat.read(PATHS[name], as_version=4).cells if c.cell_type == "code")
    assert "image_size[" not in code


class _Kernel:
    """A notebook's code cells executed in this process, one namespace, as a kernel opened in ``notebooks/``
    runs them: the parameters cell, then the smoke profile's values and ``overrides`` (figures and cache under
    ``tmp_path``). ``run(marker)`` executes the code cell whose source contains ``marker``."""

    def __init__(self, name, tmp_path, monkeypatch, **overrides):
        monkeypatch.chdir(NOTEBOOK_DIR)
        self.cells = [c.source for c in nbformat.read(PATHS[name], as_version=4).cells if c.cell_type == "code"]
        self.ns = {}
        exec(self.cells[0], self.ns)
        self.ns.update({**PROFILES["smoke"][name], "figures_dir": str(tmp_path / "figures"),
                        "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path), **overrides})

    def run(self, marker):
        (source,) = [s for s in self.cells if marker in s]
        exec(source, self.ns)
        import matplotlib.pyplot as plt

        plt.close("all")
        return self.ns


@pytest.mark.filterwarnings("ignore:.*did not converge")  # the smoke profile's few EM iterations
def test_toy_cells_run_again_draw_the_same_data_and_classifiers(tmp_path, monkeypatch):
    kernel = _Kernel("01_discriminative_vs_generative", tmp_path, monkeypatch)
    for marker in ("import numpy", "def sample(", "def fit_softmax("):
        ns = kernel.run(marker)
    data, weights = ns["X_train"].copy(), ns["linear"].weight.detach().clone()
    for marker in ("def sample(", "def fit_softmax("):      # a teacher runs the two cells again
        ns = kernel.run(marker)
    assert np.array_equal(ns["X_train"], data)
    assert torch.equal(ns["linear"].weight, weights)


def test_sinkhorn_toy_cell_run_again_fits_the_same_data(tmp_path, monkeypatch):
    kernel = _Kernel("02_sinkhorn_em", tmp_path, monkeypatch)
    kernel.run("import time")
    ns = kernel.run("def toy(")
    data, final = ns["X_bal"].clone(), ns["results"]["balanced", "em"]["final"].copy()
    ns = kernel.run("def toy(")
    assert torch.equal(ns["X_bal"], data)
    assert np.array_equal(ns["results"]["balanced", "em"]["final"], final)


def test_sinkhorn_toy_cell_plots_fits_of_one_iteration(tmp_path, monkeypatch):
    kernel = _Kernel("02_sinkhorn_em", tmp_path, monkeypatch, max_iter=1)
    kernel.run("import time")
    ns = kernel.run("def toy(")
    assert ns["results"]["balanced", "sinkhorn"]["curves"].shape == (ns["n_starts"], 1)
    assert (tmp_path / "figures" / "02_toy_lower_bounds.png").is_file()


def test_explorer_refuses_a_head_without_densities_before_training(tmp_path, monkeypatch):
    kernel = _Kernel("06_explorer", tmp_path, monkeypatch, gmm_kind="softmax")
    with pytest.raises(ValueError, match="gmm_kind must be 'gmm_paper' or 'gmm_official'.*got 'softmax'"):
        kernel.run("import numpy")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, marker", [("03_closed_set", "candidates = "), ("04_anomaly", "ANOMALY_SPLITS = ")])
def test_segmentation_notebooks_refuse_a_misspelt_dataset(tmp_path, monkeypatch, name, marker):
    kernel = _Kernel(name, tmp_path, monkeypatch, datasets=["scenes", "scenez"])
    kernel.run("import numpy")
    with pytest.raises(ValueError, match="unknown dataset 'scenez'"):
        kernel.run(marker)


@pytest.mark.parametrize("name, marker, real", [("03_closed_set", "candidates = ", {"real_datasets": ["cityscapes"]}),
                                                ("04_anomaly", "ANOMALY_SPLITS = ",
                                                 {"real_anomaly_splits": ["road_anomaly"]})])
def test_segmentation_notebooks_stop_when_no_dataset_can_be_read(tmp_path, monkeypatch, name, marker, real):
    empty = tmp_path / "data"
    empty.mkdir()
    kernel = _Kernel(name, tmp_path, monkeypatch, datasets=[], data_root=str(empty), **real)
    kernel.run("import numpy")
    with pytest.raises(RuntimeError, match="none of the .* can be read"):
        kernel.run(marker)


@pytest.mark.parametrize("value, shown", [("[0, 1]", "[0, 1]"), ("fcn", "[fcn]"), (0, "[0]")])
def test_check_list_parameters_names_a_list_passed_as_text(value, shown):
    with pytest.raises(TypeError, match=rf"^seeds must be a list, got {re.escape(repr(value))} \(.*-y 'seeds: {re.escape(shown)}'$"):
        check_list_parameters(archs=["fcn"], seeds=value)
    check_list_parameters(archs=["fcn"], seeds=(0, 1))


def test_experiment_runs_refuse_an_image_size_passed_as_text():
    with pytest.raises(TypeError, match=r"image_size must be an int or \[height, width\], got '\[64, 128\]'"):
        ExperimentRuns({**PROFILES["smoke"]["03_closed_set"], "image_size": "[64, 128]"})


def test_closed_set_notebook_refuses_seeds_passed_as_text_before_training(tmp_path, monkeypatch):
    kernel = _Kernel("03_closed_set", tmp_path, monkeypatch, seeds="[0]")      # papermill -p seeds '[0]'
    with pytest.raises(TypeError, match="seeds must be a list"):
        kernel.run("import csv")


def test_check_working_directory_wants_the_notebooks_folder_for_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"\{'cache_dir': '../outputs/cpu/cache'\} are relative .* 03_closed_set"):
        check_working_directory("03_closed_set", figures_dir=str(tmp_path), cache_dir="../outputs/cpu/cache")
    check_working_directory("03_closed_set", figures_dir=str(tmp_path), cache_dir=str(tmp_path), out_dir=None)
    (tmp_path / "03_closed_set.ipynb").write_text("{}")
    check_working_directory("03_closed_set", figures_dir="figures", cache_dir="../outputs/cpu/cache")


def test_toy_notebook_run_from_elsewhere_refuses_its_relative_default_paths(tmp_path, monkeypatch):
    kernel = _Kernel("01_discriminative_vs_generative", tmp_path, monkeypatch,
                     figures_dir="../outputs/manual/figures")     # the default of the parameters cell
    monkeypatch.chdir(tmp_path)                                     # papermill run from another directory
    with pytest.raises(RuntimeError, match="run papermill with --cwd"):
        kernel.run("import numpy")


@pytest.mark.parametrize("name, marker, bad", [("02_sinkhorn_em", "import time", {"real_arch": "deeplabv3"}),
                                               ("04_anomaly", "import numpy", {"ablation_arch": "deeplabv3"})])
def test_an_architecture_used_late_is_checked_in_the_setup_cell(tmp_path, monkeypatch, name, marker, bad):
    kernel = _Kernel(name, tmp_path, monkeypatch, **bad)
    with pytest.raises(ValueError, match="arch must be one of .* got 'deeplabv3'"):
        kernel.run(marker)


@pytest.mark.parametrize("used, archs, expected", [
    (["scenes", "fashion"], ["fcn", "segformer"],
     ["fashion sprites span 22-44 pixels: 2.8-5.5 cells of fcn's stride-8 features, 0.7-1.4 cells of "
      "segformer's stride-32 features"]),
    (["fashion"], ["deeplabv3plus"],
     ["fashion sprites span 22-44 pixels: 1.4-2.8 cells of deeplabv3plus's stride-16 features"]),
    (["fashion"], ["smp:Unet:resnet18"], ["fashion sprites span 22-44 pixels"]),
    (["scenes"], ["fcn"], []),
])
def test_closed_set_sprite_scale_names_the_strides_of_the_architectures_trained(tmp_path, monkeypatch, capsys,
                                                                                  used, archs, expected):
    kernel = _Kernel("03_closed_set", tmp_path, monkeypatch, image_size=[64, 128], archs=archs, used=used)
    kernel.run("from gmmseg_core.profiles import")
    kernel.run("DEEPEST_STRIDE = ")
    assert capsys.readouterr().out.splitlines() == expected
    kernel.ns["image_size"] = 64            # a square given as one int, as ExperimentRuns accepts it
    kernel.run("DEEPEST_STRIDE = ")
    assert capsys.readouterr().out.splitlines() == expected
