"""reproduce(): parameters reach the notebook, timings come back, and a failing notebook is named with its cell."""

import json
from pathlib import Path

import nbformat
import pytest
import torch

from gmmseg_core.profiles import NOTEBOOKS, PROFILES, notebook_parameters
from gmmseg_core.reproduce import NotebookExecutionError, NotebooksFailedError, main, reproduce


def _write_notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("value = 1\nout_dir = None\nfigures_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def failing_notebook(tmp_path):
    return _write_notebook(tmp_path / "broken_study.ipynb", [
        "x = value + 1",
        "import math\nmath.sqrt(x)",
        "raise ValueError('deliberate failure for the test')",
        "never = 'reached'",
    ])


def test_failing_notebook_names_notebook_and_cell(tmp_path, failing_notebook):
    with pytest.raises(NotebookExecutionError) as info:
        reproduce("smoke", notebooks=[failing_notebook], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
                  log=lambda *a, **k: None)
    err = info.value
    msg = str(err)
    assert "broken_study.ipynb" in msg
    assert "cell 3" in msg  # index in the source notebook: params=0, then 1, 2, 3 (the raise)
    assert err.cell_index == 3
    assert err.ename == "ValueError" and "deliberate failure for the test" in msg
    assert "raise ValueError" in msg  # the failing cell's first line
    assert err.output_path.exists()  # executed copy kept for the traceback


def test_cli_exit_code_nonzero_on_failure(tmp_path, failing_notebook, capsys):
    rc = main(["--profile", "smoke", "--notebooks", str(failing_notebook), "--out-dir", str(tmp_path / "o"),
               "--figures-dir", str(tmp_path / "f")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken_study.ipynb" in err and "cell 3" in err and "ValueError" in err


def test_keep_going_runs_the_later_notebooks_then_names_every_failure(tmp_path, failing_notebook, monkeypatch,
                                                                      capsys):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    later = _write_notebook(tmp_path / "later.ipynb", [
        "import pathlib\npathlib.Path(figures_dir, 'later_ran').write_text('yes')"])
    with pytest.raises(NotebookExecutionError):          # by default the first failure stops the run
        reproduce("smoke", notebooks=[failing_notebook, later], out_dir=tmp_path / "a", figures_dir=tmp_path / "fa",
                  log=lambda *a, **k: None)
    assert not (tmp_path / "fa" / "later_ran").exists()
    stopped = json.loads((tmp_path / "a" / "timings.json").read_text())     # written however the run ends
    assert stopped["complete"] is False and list(stopped["notebooks"]) == ["broken_study"]
    assert "deliberate failure" in stopped["notebooks"]["broken_study"]["error"]
    with pytest.raises(NotebooksFailedError) as info:
        reproduce("smoke", notebooks=[failing_notebook, later], out_dir=tmp_path / "b", figures_dir=tmp_path / "fb",
                  keep_going=True, log=lambda *a, **k: None)
    assert (tmp_path / "fb" / "later_ran").read_text() == "yes"
    err = info.value
    assert [f.cell_index for f in err.failures] == [3]
    assert str(err).startswith("1 of 2 notebooks failed") and "broken_study.ipynb failed in cell 3" in str(err)
    timings = json.loads((tmp_path / "b" / "timings.json").read_text())["notebooks"]
    assert "deliberate failure" in timings["broken_study"]["error"] and "error" not in timings["later"]
    assert err.result["notebooks"] == timings
    rc = main(["--profile", "smoke", "--notebooks", str(failing_notebook), str(later), "--keep-going",
               "--out-dir", str(tmp_path / "c"), "--figures-dir", str(tmp_path / "fc")])
    assert rc == 1 and (tmp_path / "fc" / "later_ran").exists()
    assert "1 of 2 notebooks failed" in capsys.readouterr().err


def test_parameters_injected_and_timings_returned(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # reproduce() sets them for its kernels; restore after
        monkeypatch.setenv(var, "7")
    nb = _write_notebook(tmp_path / "ok.ipynb", [
        "import json, os, pathlib\n"
        "pathlib.Path(figures_dir, 'seen.json').write_text(json.dumps({'value': value, 'out_dir': out_dir,\n"
        "    'threads': os.environ.get('OMP_NUM_THREADS')}))",
    ])
    res = reproduce("smoke", notebooks=[nb], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
                    parameters={"value": 7}, log=lambda *a, **k: None)
    seen = json.loads((tmp_path / "fig" / "seen.json").read_text())
    assert seen == {"value": 7, "out_dir": str((tmp_path / "out").resolve()), "threads": "1"}  # 1 on the CPU
    assert set(res["notebooks"]) == {"ok"} and res["notebooks"]["ok"]["seconds"] > 0
    assert (tmp_path / "out" / "ok.ipynb").exists() and (tmp_path / "out" / "timings.json").exists()


_TERMINATED_RUN = """
import sys
from gmmseg_core.reproduce import reproduce
reproduce("smoke", notebooks=[sys.argv[1]], out_dir=sys.argv[2], figures_dir=sys.argv[3], log=lambda *a, **k: None)
"""


def test_a_terminated_run_stops_its_kernel_and_what_the_kernel_started(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    nb = _write_notebook(tmp_path / "slow.ipynb", [
        "import subprocess, time\n"
        f"child = subprocess.Popen(['sleep', '120'])\nopen({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)"])
    run = subprocess.Popen([sys.executable, "-c", _TERMINATED_RUN, str(nb), str(tmp_path / "out"),
                            str(tmp_path / "fig")], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), run.stderr.read() if run.poll() is not None else "the notebook did not start"
    run.send_signal(signal.SIGTERM)                     # as a scheduler or `kill` ends a job
    assert run.wait(timeout=30) != 0
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}"), "the kernel's child process outlived the run"
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["complete"] is False and "interrupted" in timings["notebooks"]["slow"]["error"]


def test_run_wide_names_are_refused_as_parameters_before_anything_is_created(tmp_path):
    with pytest.raises(ValueError, match=r"parameters \['figures_dir'\] are set for the whole run by "
                                         r"reproduce's own arguments .*figures_dir= / --figures-dir"):
        reproduce("smoke", notebooks=[NOTEBOOKS[0]], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
                  parameters={"figures_dir": "elsewhere"})
    with pytest.raises(ValueError, match="are not declared by any notebook"):
        reproduce("smoke", notebooks=[NOTEBOOKS[0]], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
                  parameters={"nope": 1})
    assert not any(tmp_path.iterdir())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="profile must be one of"):
        reproduce("laptop", out_dir=tmp_path)
    with pytest.raises(ValueError, match="notebooks: no notebook found for 'nope'"):
        reproduce("smoke", notebooks=["nope"], out_dir=tmp_path, figures_dir=tmp_path)
    with pytest.raises(ValueError, match=r"notebooks: '0' matches \['01_discriminative_vs_generative', "
                                         r"'02_sinkhorn_em', .*give one of them"):
        reproduce("smoke", notebooks=["0"], out_dir=tmp_path, figures_dir=tmp_path)
    with pytest.raises(ValueError, match="threads must be None or a positive int, got 0"):
        reproduce("smoke", notebooks=["01_discriminative_vs_generative"], out_dir=tmp_path,
                  figures_dir=tmp_path, threads=0)


def test_run_wide_paths_and_device_are_resolved_and_checked_before_anything_runs(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    nb = _write_notebook(tmp_path / "ok.ipynb", [
        "import json, pathlib\npathlib.Path(figures_dir, 'seen.json').write_text(json.dumps(data_root))"])
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    # a relative data root means the caller's folder, not the kernels' (notebooks/)
    res = reproduce("smoke", notebooks=[nb], out_dir="out", data_root="data", log=lambda *a, **k: None)
    figures = tmp_path / "out" / "figures"                      # not figures/: that is the cpu reference run
    assert res["figures_dir"] == str(figures)
    assert json.loads((figures / "seen.json").read_text()) == str(tmp_path / "data")
    for kwargs, message in [(dict(data_root="missing"),
                             "data_root .*missing' is not a directory.*gmmseg_core/data/readers.py"),
                            (dict(device="bogus"), "device must be a torch device string")]:
        with pytest.raises(ValueError, match=message):
            reproduce("smoke", notebooks=[nb], out_dir="refused", **kwargs)
        assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):
        main(["--profile", "smoke", "--notebooks"])              # a list of no notebooks is not "run nothing"


def test_extra_parameters_go_only_where_declared_and_typos_are_refused(tmp_path):
    seen = tmp_path / "seen"
    a = _write_notebook(tmp_path / "a.ipynb", ["open(figures_dir + '/a.txt', 'w').write(str(value))"])
    b = _write_notebook(tmp_path / "b.ipynb", ["open(figures_dir + '/b.txt', 'w').write(str('value' in globals()))"])
    nb = nbformat.read(b, as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("value = 1\n", "")   # b does not declare it
    nbformat.write(nb, b)
    with pytest.raises(ValueError, match=r"parameters \['valeu'\] are not declared by any notebook of this run "
                                         r"\(a, b\)"):
        reproduce("smoke", notebooks=[a, b], out_dir=tmp_path / "out", figures_dir=seen, parameters={"valeu": 3})
    assert not seen.exists() or not any(seen.iterdir())
    reproduce("smoke", notebooks=[a, b], out_dir=tmp_path / "out", figures_dir=seen, parameters={"value": 3},
              log=lambda *a, **k: None)
    assert (seen / "a.txt").read_text() == "3" and (seen / "b.txt").read_text() == "False"


def test_missing_notebook_packages_are_named_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "papermill" else real(name, *a))
    with pytest.raises(ImportError, match=r"running the notebooks needs papermill: pip install 'gmmseg\[notebooks\]'"):
        reproduce("smoke", out_dir=tmp_path)


def test_profiles_cover_every_notebook():
    for profile in ("smoke", "cpu", "gpu"):
        assert set(PROFILES[profile]) == set(NOTEBOOKS)
        # shared training parameters are identical across the training notebooks (same cache key)
        trained = [notebook_parameters(profile, nb) for nb in NOTEBOOKS[1:]]
        for key in ("image_size", "train_iters", "width", "embed_dim", "num_components", "lr"):
            assert len({repr(p[key]) for p in trained}) == 1, (profile, key)


def test_experiment_config_carries_amp_and_workers_without_changing_the_cache_key():
    from gmmseg_core.profiles import TRAIN, experiment_config

    gpu = experiment_config(TRAIN["gpu"], "fcn", "gmm_official", "scenes", 0)
    assert (gpu.amp, gpu.num_workers) == (TRAIN["gpu"]["amp"], TRAIN["gpu"]["num_workers"])
    cpu = experiment_config(TRAIN["cpu"], "fcn", "softmax", "scenes", 0)
    legacy = {k: v for k, v in TRAIN["cpu"].items() if k not in ("amp", "num_workers")}
    old = experiment_config(legacy, "fcn", "softmax", "scenes", 0)  # optional keys default to none / 0
    assert (old.amp, old.num_workers) == ("none", 0) and old.cache_key() == cpu.cache_key()
    # workers say how a run is fed, not what is trained: the trained-model cache is shared
    assert cpu.replace(num_workers=4).cache_key() == cpu.cache_key()
    with pytest.raises(ValueError, match=r"train_params is missing \['lr'\]"):
        experiment_config({k: v for k, v in TRAIN["cpu"].items() if k != "lr"}, "fcn", "softmax", "scenes", 0)


def test_experiment_config_gives_smp_backbones_no_width():
    from gmmseg_core.profiles import TRAIN, experiment_config

    assert experiment_config(TRAIN["cpu"], "fcn", "softmax", "scenes", 0).model_kwargs == {"width": 8}
    smp = experiment_config(TRAIN["cpu"], "smp:Unet:resnet18", "gmm_official", "scenes", 0)
    assert smp.model_kwargs == {}              # smp encoders have no width (timm ones reject it)
    offline = experiment_config(TRAIN["cpu"], "smp:Unet:resnet18", "softmax", "scenes", 0,
                                model_kwargs={"encoder_weights": None})
    assert offline.model_kwargs == {"encoder_weights": None}


def test_experiment_config_augments_real_datasets_only():
    from gmmseg_core.data.transforms import Compose
    from gmmseg_core.profiles import TRAIN, experiment_config
    from gmmseg_core.train import dataset_kwargs_for

    real = experiment_config(TRAIN["gpu"], "fcn", "gmm_paper", "cityscapes", 0, data_root="/data/cityscapes")
    assert real.dataset_kwargs["transform"] == {"crop_size": [256, 512]}
    assert isinstance(dataset_kwargs_for(real, "train")["transform"], Compose)
    assert "transform" not in dataset_kwargs_for(real, "val")
    assert "transform" not in experiment_config(TRAIN["gpu"], "fcn", "gmm_paper", "scenes", 0).dataset_kwargs


def test_experiment_runs_train_once_and_say_whether_a_model_was_trained_now(tmp_path, capsys):
    from gmmseg_core.profiles import TRAIN, ExperimentRuns, experiment_config

    with pytest.raises(ValueError, match=r"train_params is missing \['width'\]"):
        ExperimentRuns({k: v for k, v in TRAIN["smoke"].items() if k != "width"}, cache_dir=tmp_path)
    params = dict(TRAIN["smoke"], train_iters=1, num_train_images=4, num_val_images=2)
    runs = ExperimentRuns(params, cache_dir=tmp_path)
    cfg = runs.config("fcn", "gmm_paper", "scenes", 1, num_components=2)
    assert cfg == experiment_config(params, "fcn", "gmm_paper", "scenes", 1, cache_dir=tmp_path, num_components=2)
    run_dirs = runs.train_all([cfg, runs.config("fcn", "gmm_paper", "scenes", 1, num_components=2)])
    run_dir = run_dirs[0]
    assert run_dirs == [run_dir, run_dir]
    model, metrics, same_dir = runs.trained("fcn", "gmm_paper", "scenes", 1, num_components=2)
    assert same_dir == run_dir and model.head.num_components == 2 and not model.training
    assert metrics["finished"]
    assert "(trained in" in capsys.readouterr().out           # trained by this object's notebook run
    later = ExperimentRuns(params, cache_dir=tmp_path)         # a later notebook run finds it in the cache
    later.trained("fcn", "gmm_paper", "scenes", 1, num_components=2)
    assert capsys.readouterr().out.strip().endswith("(cached)")


def test_experiment_runs_report_a_model_as_trained_now_once_then_as_cached(tmp_path, capsys):
    from gmmseg_core.profiles import TRAIN, ExperimentRuns

    runs = ExperimentRuns(dict(TRAIN["smoke"], train_iters=1, num_train_images=4, num_val_images=2),
                          cache_dir=tmp_path)
    runs.train_all([runs.config("fcn", "softmax")])
    for _ in range(2):                                  # the cell that reads the models, run twice
        runs.trained("fcn", "softmax")
        runs.trained("fcn", "gmm_paper")                # trained by trained() itself the first time
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.endswith("(cached)") for line in lines] == [False, False, True, True]
    assert "(trained in" in lines[0] and "(trained in" in lines[1]


def test_notebook_trainings_run_single_threaded_on_the_cpu_as_reproduce_runs_them(tmp_path, monkeypatch):
    import gmmseg_core.train as train_module
    from gmmseg_core.profiles import TRAIN, ExperimentRuns

    seen, real_train_cached = [], train_module.train_cached

    def fake_train_cached(cfg, cache_dir):
        seen.append(torch.get_num_threads())
        return real_train_cached(cfg, cache_dir)

    params = dict(TRAIN["smoke"], train_iters=1, num_train_images=4, num_val_images=2)
    runs = ExperimentRuns(params, cache_dir=tmp_path)
    before = torch.get_num_threads()
    monkeypatch.setattr(train_module, "train_cached", fake_train_cached)
    torch.set_num_threads(2)                                    # a kernel opened by hand: every core
    try:
        runs.trained("fcn", "softmax", "scenes", 0, verbose=False)
        assert seen == [1] and torch.get_num_threads() == 2     # trained on one thread, the caller's restored
    finally:
        torch.set_num_threads(before)


def test_experiment_config_carries_every_shared_training_parameter(tmp_path):
    from gmmseg_core.profiles import TRAIN, experiment_config

    p = TRAIN["smoke"]
    cfg = experiment_config(p, "fcn", "gmm_paper", "scenes", 2, device="cpu", cache_dir=tmp_path, em="classic")
    assert cfg.head_kwargs == dict(variant="paper", num_components=p["num_components"], embed_dim=p["embed_dim"],
                                   update_interval=p["update_interval"], mean_momentum=p["mean_momentum"],
                                   em="classic")
    assert cfg.dataset_kwargs == dict(image_size=p["image_size"], num_images=p["num_train_images"],
                                      cache_dir=str(tmp_path / "data"))
    assert cfg.val_dataset_kwargs == {"num_images": p["num_val_images"]}
    assert (cfg.iters, cfg.batch_size, cfg.lr, cfg.seed, cfg.device, cfg.out_dir, cfg.progress) == (
        p["train_iters"], p["batch_size"], p["lr"], 2, "cpu", str(tmp_path), False)
    with pytest.raises(ValueError, match="head_overrides are GMM knobs; the softmax head takes none"):
        experiment_config(p, "fcn", "softmax", "scenes", 0, em="classic")


def test_an_empty_data_root_is_none_and_the_run_wide_paths_reach_the_notebook_absolute(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    nb = _write_notebook(tmp_path / "paths.ipynb", [
        "import json, pathlib\npathlib.Path(figures_dir, 'seen.json').write_text(json.dumps([data_root, cache_dir]))"])
    source = nbformat.read(nb, as_version=4)
    source.cells[0].source += "\ndata_root = 'unset'\ncache_dir = 'unset'"
    nbformat.write(source, nb)
    monkeypatch.chdir(tmp_path)
    res = reproduce("smoke", notebooks=[nb], out_dir="out", data_root="", cache_dir="models",
                    log=lambda *a, **k: None)
    seen = json.loads((tmp_path / "out" / "figures" / "seen.json").read_text())
    assert seen == [None, str(tmp_path / "models")]
    assert res["complete"] is True and json.loads((tmp_path / "out" / "timings.json").read_text())["complete"]


def test_threads_may_be_a_numpy_integer(tmp_path, monkeypatch):
    import os
    from contextlib import nullcontext

    import numpy as np

    import gmmseg_core.reproduce as reproduce_module

    seen = []
    monkeypatch.setattr(reproduce_module, "run_notebook",
                        lambda *a, **k: seen.append((os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"])))
    monkeypatch.setattr(reproduce_module, "_kernel", lambda: nullcontext("python3"))
    nb = _write_notebook(tmp_path / "ok.ipynb", ["pass"])
    reproduce("smoke", notebooks=[nb], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
              threads=np.int64(2), log=lambda *a, **k: None)
    assert seen == [("2", "2")]
    assert json.loads((tmp_path / "out" / "timings.json").read_text())["profile"] == "smoke"
    with pytest.raises(ValueError, match="threads must be None or a positive int, got True"):
        reproduce("smoke", notebooks=[nb], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig", threads=True)


def _quiet(*args, **kwargs):
    pass


def test_a_partial_run_keeps_the_timings_of_the_notebooks_it_did_not_run(tmp_path, failing_notebook, monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    a, b = (_write_notebook(tmp_path / f"{name}.ipynb", ["x = value"]) for name in "ab")
    timings = tmp_path / "out" / "timings.json"
    run = dict(out_dir=tmp_path / "out", figures_dir=tmp_path / "fig", log=_quiet, progress=False)
    reproduce("smoke", notebooks=[a, b], **run)
    first = json.loads(timings.read_text())["notebooks"]
    res = reproduce("smoke", notebooks=[b], **run)
    assert list(res["notebooks"]) == ["b"] and res["complete"] is True        # what this run did
    merged = json.loads(timings.read_text())
    assert list(merged["notebooks"]) == ["a", "b"] and merged["complete"] is True
    assert merged["notebooks"]["a"] == {**first["a"], "earlier_run": True}      # kept, and said to be older
    assert "earlier_run" not in merged["notebooks"]["b"] and merged["notebooks"]["b"] == res["notebooks"]["b"]
    assert merged["notebooks"]["b"]["started"] >= first["b"]["started"]
    with pytest.raises(NotebookExecutionError):
        reproduce("smoke", notebooks=[failing_notebook], **run)
    reproduce("smoke", notebooks=[a], **run)             # this run completes, but the file holds a failure
    merged = json.loads(timings.read_text())
    assert list(merged["notebooks"]) == ["a", "b", "broken_study"] and merged["complete"] is False
    assert "error" in merged["notebooks"]["broken_study"] and merged["notebooks"]["broken_study"]["earlier_run"]
    reproduce("cpu", notebooks=[b], **run)               # another profile's entries are not this one's
    assert list(json.loads(timings.read_text())["notebooks"]) == ["b"]


def test_a_keep_going_run_with_a_failure_is_not_complete(tmp_path, monkeypatch):
    from gmmseg_core import reproduce as reproduce_module

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    a, b = (_write_notebook(tmp_path / f"{name}.ipynb", ["x = value"]) for name in "ab")

    def run_notebook(notebook, output, parameters, **kwargs):      # no kernel: a fails, b runs
        output.write_text("{}")
        if notebook.stem == "a":
            raise NotebookExecutionError(notebook, output, 1, "ValueError", "deliberate")
        return 0.0

    monkeypatch.setattr(reproduce_module, "run_notebook", run_notebook)
    with pytest.raises(NotebooksFailedError) as info:
        reproduce("smoke", notebooks=[a, b], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig",
                  keep_going=True, log=_quiet, progress=False)
    assert info.value.result["complete"] is False
    assert json.loads((tmp_path / "out" / "timings.json").read_text())["complete"] is False


def test_resume_skips_only_notebooks_finished_with_the_same_parameters_source_and_executed_copy(tmp_path,
                                                                                               monkeypatch):
    import shutil

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "7")
    out, fig = tmp_path / "out", tmp_path / "fig"
    record = "open(figures_dir + '/ran.txt', 'a').write('{} ')\n"
    a = _write_notebook(tmp_path / "a.ipynb", [record.format("a")])
    b = _write_notebook(tmp_path / "b.ipynb", [
        record.format("b") + f"import shutil; shutil.copy(out_dir + '/timings.json', {str(tmp_path / 'mid.json')!r})"])
    nb = nbformat.read(b, as_version=4)
    nb.cells[0].source = nb.cells[0].source.replace("value = 1\n", "")     # b does not declare value
    nbformat.write(nb, b)
    lines = []

    def run(**kwargs):
        (fig / "ran.txt").unlink(missing_ok=True)
        res = reproduce("smoke", notebooks=[a, b], out_dir=out, figures_dir=fig, resume=True, progress=False,
                        log=lambda *args, **kw: lines.append(args[0]), **kwargs)
        ran = (fig / "ran.txt").read_text().split() if (fig / "ran.txt").exists() else []
        return ran, res

    assert run()[0] == ["a", "b"]                       # nothing to resume from: every notebook runs
    lines.clear()
    ran, res = run()
    assert ran == [] and res["complete"] and all(e["earlier_run"] for e in res["notebooks"].values())
    assert lines[0].startswith("[1/2] a: skipped, finished by an earlier run with the same parameters in ")
    assert json.loads((out / "timings.json").read_text())["complete"] is True
    # killed while b ran: the timings of that moment say b started and never ended
    assert "seconds" not in json.loads((tmp_path / "mid.json").read_text())["notebooks"]["b"]
    shutil.copy(tmp_path / "mid.json", out / "timings.json")
    assert run()[0] == ["b"]
    assert run(parameters={"value": 2})[0] == ["a"]     # b takes no value: its parameters are the same
    (out / "b.ipynb").unlink()
    assert run(parameters={"value": 2})[0] == ["b"]     # its executed copy is gone
    nb = nbformat.read(a, as_version=4)
    nb.cells[1].source += "\n# edited"
    nbformat.write(nb, a)
    assert run(parameters={"value": 2})[0] == ["a"]     # its source changed


def test_a_second_run_into_the_same_output_folder_stops_before_anything_runs(tmp_path, capsys):
    import os

    from gmmseg_core._files import DirectoryLock

    nb = _write_notebook(tmp_path / "ok.ipynb", ["open(figures_dir + '/ran.txt', 'w').write('yes')"])
    out, fig = tmp_path / "out", tmp_path / "fig"
    with DirectoryLock(out, name="reproduce.lock"):          # as a run writing there holds it
        with pytest.raises(OSError, match=rf"the directory '{out}' is in use by process {os.getpid()} on host .*"
                                          r"another out_dir \(--out-dir\)"):
            reproduce("smoke", notebooks=[nb], out_dir=out, figures_dir=fig, log=_quiet)
        assert main(["--profile", "smoke", "--notebooks", str(nb), "--out-dir", str(out), "--figures-dir",
                     str(fig)]) == 2
        assert f"gmmseg reproduce: error: the directory '{out}' is in use" in capsys.readouterr().err
        assert not fig.exists() and [p.name for p in out.iterdir()] == ["reproduce.lock"]
    reproduce("smoke", notebooks=[nb], out_dir=out, figures_dir=fig, log=_quiet, progress=False)
    assert (fig / "ran.txt").read_text() == "yes" and not (out / "reproduce.lock").exists()


def test_the_callers_environment_is_restored_and_the_private_kernelspec_removed_however_a_run_ends(
        tmp_path, monkeypatch):
    import os
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    import gmmseg_core.reproduce as reproduce_module
    from gmmseg_core._files import DirectoryLock

    def no_python3(self, name):         # as when the python3 kernelspec runs another interpreter
        raise NoSuchKernel(name)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", no_python3)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setenv("JUPYTER_PATH", "/elsewhere")
    before = dict(os.environ)
    seen = []

    def run_notebook(notebook, output, parameters, kernel_name=None, **kwargs):
        kernels = os.environ["JUPYTER_PATH"].split(os.pathsep)[0]
        seen.append((kernel_name, os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"],
                     (Path(kernels) / "kernels" / kernel_name / "kernel.json").is_file()))
        if notebook.stem == "bad":
            raise NotebookExecutionError(notebook, output, 1, "ValueError", "deliberate")

    monkeypatch.setattr(reproduce_module, "run_notebook", run_notebook)
    good, bad = (_write_notebook(tmp_path / f"{name}.ipynb", ["pass"]) for name in ("good", "bad"))
    run = dict(out_dir=tmp_path / "out", figures_dir=tmp_path / "fig", log=_quiet, progress=False, threads=3)
    reproduce("smoke", notebooks=[good], **run)
    assert seen == [("gmmseg-python", "3", "3", True)]
    assert dict(os.environ) == before and list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(NotebookExecutionError):
        reproduce("smoke", notebooks=[bad], **run)
    assert dict(os.environ) == before and list((tmp_path / "tmp").iterdir()) == []
    with DirectoryLock(tmp_path / "out", name="reproduce.lock"), pytest.raises(OSError, match="is in use"):
        reproduce("smoke", notebooks=[good], **run)
    assert dict(os.environ) == before and list((tmp_path / "tmp").iterdir()) == []


def test_a_notebook_runs_on_a_private_kernelspec_that_is_gone_afterwards(tmp_path, monkeypatch):
    import os
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from gmmseg_core.reproduce import run_notebook

    found = KernelSpecManager.get_kernel_spec

    def without_python3(self, name):     # as when the python3 kernelspec runs another interpreter
        if name == "python3":
            raise NoSuchKernel(name)
        return found(self, name)

    monkeypatch.setattr(KernelSpecManager, "get_kernel_spec", without_python3)
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    nb = _write_notebook(tmp_path / "which.ipynb", [
        "import json, os, pathlib, sys\n"
        "pathlib.Path(figures_dir, 'seen.json').write_text(json.dumps([sys.executable, os.environ['JUPYTER_PATH']]))"])
    run_notebook(nb, tmp_path / "out" / "which.ipynb", {"figures_dir": str(tmp_path)}, progress=False)
    python, kernels = json.loads((tmp_path / "seen.json").read_text())
    assert python == sys.executable and Path(kernels).name.startswith("gmmseg-kernels-")
    assert "JUPYTER_PATH" not in os.environ and not Path(kernels).exists()


def test_a_data_set_that_cannot_be_read_is_named_before_any_notebook_runs(tmp_path, monkeypatch):
    from contextlib import nullcontext

    import gmmseg_core.reproduce as reproduce_module
    from gmmseg_core.data import composites

    monkeypatch.delenv("GMMSEG_DATA", raising=False)
    monkeypatch.setattr(composites, "FASHION_DIRS", (str(tmp_path / "no-fashion-here"),))
    lines = []
    monkeypatch.setattr(reproduce_module, "run_notebook", lambda nb, *a, **k: lines.append(f"ran {nb.stem}"))
    monkeypatch.setattr(reproduce_module, "_kernel", lambda: nullcontext("python3"))
    folders = dict(out_dir=tmp_path / "out", figures_dir=tmp_path / "fig")
    reproduce("smoke", notebooks=["01", "03", "04"], log=lambda msg, **k: lines.append(msg), **folders)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and lines.index(notes[0]) < lines.index("ran 01_discriminative_vs_generative")
    assert notes[0].startswith("note: the data set 'fashion' cannot be read here (FileNotFoundError: Fashion-MNIST "
                               "files train-images-idx3-ubyte[.gz]")
    assert notes[0].endswith("; 03_closed_set, 04_anomaly will leave it out of their tables and figures")

    lines.clear()               # a run without it says nothing; a misspelt name stops the run before it starts
    reproduce("smoke", notebooks=["03"], parameters={"datasets": ["scenes"]}, log=lambda msg, **k: lines.append(msg),
              **folders)
    assert not [line for line in lines if line.startswith("note:")] and "ran 03_closed_set" in lines
    lines.clear()
    with pytest.raises(ValueError, match="unknown dataset 'fashon'"):
        reproduce("smoke", notebooks=["03"], parameters={"datasets": ["fashon"]}, **folders)
    assert lines == []


def test_timings_name_the_machine_whose_kernels_drew_the_figures(tmp_path, monkeypatch):
    from contextlib import nullcontext

    import torch

    import gmmseg_core.reproduce as reproduce_module
    from gmmseg_core._machine import cpu_description

    monkeypatch.setattr(reproduce_module, "run_notebook", lambda *a, **k: None)
    monkeypatch.setattr(reproduce_module, "_kernel", lambda: nullcontext("python3"))
    monkeypatch.setenv("MKL_CBWR", "AVX2")                          # a kernel cap: the run says it was set
    nb = _write_notebook(tmp_path / "ok.ipynb", ["pass"])
    result = reproduce("smoke", notebooks=[nb], out_dir=tmp_path / "out", figures_dir=tmp_path / "fig", log=_quiet)
    machine = json.loads((tmp_path / "out" / "timings.json").read_text())["machine"]
    assert machine == result["machine"] and machine["cpu"] == cpu_description() and machine["gpu"] is None
    assert machine["kernel_caps"].get("MKL_CBWR") == "AVX2"
    assert machine["torch"] == torch.__version__ and machine["cpu_cores"] >= 1
    assert cpu_description().endswith(", " + torch.backends.cpu.get_cpu_capability())   # the kernels' SIMD level


def test_a_cuda_run_records_its_gpu(monkeypatch):
    import torch

    import gmmseg_core.reproduce as reproduce_module

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(device) or "Test GPU")
    assert reproduce_module._machine("cuda:1")["gpu"] == "Test GPU" and asked == [torch.device("cuda:1")]
    assert reproduce_module._machine("cuda")["gpu"] == "Test GPU"
    assert reproduce_module._machine(None)["gpu"] is None and reproduce_module._machine("cpu")["gpu"] is None
