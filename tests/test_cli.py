"""The ``gmmseg`` command, called in-process through ``main([...])`` (and once as a subprocess)."""

import json
import subprocess
import sys

import pytest

from gmmseg_core.cli import main

TINY = ["--arch", "fcn", "--iters", "2", "--batch-size", "2", "--image-size", "32", "--no-progress",
        "--set", "model_kwargs.width=4", "--set", 'head_kwargs={"embed_dim": 4, "num_components": 2}',
        "--set", "dataset_kwargs.num_images=4", "--set", 'val_dataset_kwargs={"num_images": 2}']


def test_help_lists_the_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "evaluate", "reproduce", "bench", "examples:"):
        assert word in out
    assert main([]) == 1  # no command: help, failure status
    for command in ("train", "evaluate", "reproduce", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: gmmseg " + command in capsys.readouterr().out


def test_print_config_merges_file_flags_and_overrides(tmp_path, capsys):
    from gmmseg_core.config import TrainConfig

    base = tmp_path / "base.json"
    TrainConfig(lr=0.5, iters=9, seed=3).to_json(base)
    assert main(["train", "--config", str(base), "--iters", "4", "--variant", "official",
                 "--set", "seed=7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["iters"], cfg["seed"], cfg["head_kwargs"]) == (0.5, 4, 7, {"variant": "official"})
    assert main(["train", "--set", "iters=0", "--print-config"]) == 2
    assert "iters must be a positive int, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--head", "softmax", "--variant", "official"],
     "--variant official is a GMM head variant, but the head is 'softmax'"),
    (["--set", "head_kwargs.bogus=1"], "head_kwargs ['bogus'] are not arguments of GMMHead"),
    (["--set", "model_kwargs.bogus=1"], "model_kwargs ['bogus'] are not arguments of FCNBackbone"),
    (["--seed", "-1"], "seed must be an int in [0, 2**32), got -1"),
])
def test_train_rejects_arguments_the_model_would_not_take(tmp_path, capsys, args, message):
    assert main(["train", "--arch", "fcn", *args, "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())                 # nothing written before the error


def test_train_then_evaluate_closed_set_and_anomaly(tmp_path, capsys):
    assert main(["train", *TINY, "--out-dir", str(tmp_path), "--run-name", "run"]) == 0
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoint.pt").exists()
    assert "run directory" in capsys.readouterr().out

    assert main(["evaluate", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "miou" in out
    val = json.loads((run_dir / "eval_scenes_val.json").read_text())
    assert 0 <= val["results"]["miou"] <= 1

    target = tmp_path / "anomaly.json"
    assert main(["evaluate", str(run_dir), "--split", "anomaly", "--num-images", "2", "--scorers", "msp", "gmm",
                 "--streaming", "--output", str(target), "--no-progress"]) == 0
    res = json.loads(target.read_text())["results"]
    assert set(res) == {"msp", "gmm"} and 0 <= res["gmm"]["auroc"] <= 1
    assert "fpr95" in capsys.readouterr().out


def test_evaluate_checks_its_options_before_evaluating(tmp_path, capsys):
    assert main(["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
                 "--run-name", "sm"]) == 0
    run = str(tmp_path / "sm")
    capsys.readouterr()
    for args, message in [
        (["--split", "anomaly", "--scorers", "msp", "bogus"], "--scorers ['bogus'] are not scorers"),
        (["--split", "anomaly", "--scorers", "gmm"], "--scorers gmm needs a GMM head"),
        (["--scorers", "msp"], "--scorers applies to anomaly splits; scenes/val is a closed-set split"),
        (["--streaming"], "--streaming applies to anomaly splits; scenes/val is a closed-set split"),
        (["--crop-size", "16"], "--crop-size and --stride apply to --mode slide"),
        (["--split", "anomaly", "--sml-images", "-1"], "--sml-images must be >= 0 (0 = all training images), got -1"),
        (["--output", str(tmp_path)], "--output must be a file path, got the directory"),
        (["--output", str(tmp_path / "sm" / "config.json" / "x.json")], "config.json' is a file"),
        (["--device", "gpu"], "device must be a torch device string"),
    ]:
        assert main(["evaluate", run, "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    target = tmp_path / "new" / "folder" / "val.json"           # missing folders are made
    assert main(["evaluate", run, "--no-progress", "--num-images", "1", "--output", str(target)]) == 0
    written = json.loads(target.read_text())
    assert written["split"] == "val" and written["options"]["mode"] == "whole"
    assert written["options"]["num_images"] == 1


def test_evaluate_finds_moved_training_data_through_data_root(tmp_path, capsys):
    import gzip

    import numpy as np

    def write_idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    old_root = tmp_path / "old"                 # a tiny Fashion-MNIST look-alike in the real file naming
    old_root.mkdir()
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, 6:22, 8:20] = 200
    for part in ("train", "t10k"):
        write_idx(old_root / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(old_root / f"{part}-labels-idx1-ubyte.gz", np.arange(20) % 10)
    args = [a for a in TINY if a != "--no-progress"]
    assert main(["train", *args, "--no-progress", "--dataset", "fashion", "--data-root", str(old_root),
                 "--out-dir", str(tmp_path), "--run-name", "fa"]) == 0
    new_root = old_root.rename(tmp_path / "new")          # the data moved (another machine, another disk)
    capsys.readouterr()
    # the sml statistics read the training split: from --data-root, not from the run's old root
    assert main(["evaluate", str(tmp_path / "fa"), "--split", "anomaly", "--num-images", "1", "--sml-images", "2",
                 "--scorers", "sml", "--data-root", str(new_root), "--no-progress"]) == 0, capsys.readouterr().err


def test_evaluate_reports_a_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_train_reports_a_diverged_run_without_a_traceback(tmp_path, monkeypatch, capsys):
    import gmmseg_core.train as train_module

    def diverge(cfg):
        raise FloatingPointError("training diverged: the loss is nan at step 7 (lr 0.1)")

    monkeypatch.setattr(train_module, "train", diverge)
    assert main(["train", *TINY, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "gmmseg train: error: training diverged: the loss is nan at step 7" in err and "Traceback" not in err


def test_reproduce_delegates(monkeypatch):
    import gmmseg_core.reproduce as rep

    calls = []
    monkeypatch.setattr(rep, "reproduce", lambda *args, **kw: calls.append((args, kw)) or {})
    assert main(["reproduce", "--profile", "smoke", "--data-root", "/data", "--device", "cpu",
                 "--out-dir", "o", "--threads", "2"]) == 0
    assert calls == [(("smoke",), dict(data_root="/data", device="cpu", out_dir="o", figures_dir=None,
                                       cache_dir=None, notebooks=None, threads=2, parameters=None,
                                       keep_going=False))]


def test_reproduce_set_overrides_notebook_parameters(monkeypatch, capsys):
    import gmmseg_core.reproduce as rep

    calls = []
    monkeypatch.setattr(rep, "reproduce", lambda *args, **kw: calls.append(kw) or {})
    assert main(["reproduce", "--profile", "cpu", "--set", "train_processes=4", "--set", "seeds=[0]",
                 "--set", "arch=segformer"]) == 0
    assert calls[0]["parameters"] == {"train_processes": 4, "seeds": [0], "arch": "segformer"}
    assert main(["reproduce", "--set", "head_kwargs.variant=official"]) == 2
    assert "--set names a notebook parameter (a Python name), got ['head_kwargs.variant']" in capsys.readouterr().err


def test_reproduce_reports_a_failing_notebook_without_a_traceback(monkeypatch, capsys):
    import gmmseg_core.reproduce as rep

    def fail(*args, **kw):
        raise rep.NotebookExecutionError("notebooks/03_closed_set.ipynb", "out/03.ipynb", 4, "ValueError", "bad")

    monkeypatch.setattr(rep, "reproduce", fail)
    assert main(["reproduce", "--profile", "smoke"]) == 1
    err = capsys.readouterr().err
    assert "03_closed_set.ipynb" in err and "cell 4" in err and "Traceback" not in err


def test_bench_rejects_unknown_benchmarks(monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["bench", "--only", "bench_does_not_exist"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_module_entry_point_runs_as_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "gmmseg_core", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "usage: gmmseg" in out.stdout


def test_an_interrupted_command_exits_130_with_the_reason(monkeypatch, capsys):
    import gmmseg_core.train as train_module

    def interrupted(cfg):
        raise KeyboardInterrupt("training stopped after step 3; its checkpoint is in 'x'")

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", *TINY]) == 130
    assert "gmmseg train: interrupted: training stopped after step 3" in capsys.readouterr().err


def test_train_names_an_unknown_dataset(capsys):
    assert main(["train", "--dataset", "mnist", "--print-config"]) == 2
    assert "unknown dataset 'mnist'; available datasets:" in capsys.readouterr().err


def test_train_resumes_the_run_its_config_file_belongs_to(tmp_path, monkeypatch, capsys):
    from gmmseg_core import train as train_module

    runs = tmp_path / "project" / "runs"
    assert main(["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--set", "checkpoint_interval=2",
                 "--iters", "4", "--out-dir", str(runs), "--run-name", "r"]) == 0
    config = json.loads((runs / "r" / "config.json").read_text())
    config["out_dir"] = "runs"                       # as written by a run started inside project/
    (runs / "r" / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    seen = {}
    monkeypatch.setattr(train_module, "train", lambda cfg: seen.setdefault("run_dir", cfg.run_dir))
    assert main(["train", "--config", str(runs / "r" / "config.json"), "--resume", "--iters", "6"]) == 0
    assert seen["run_dir"] == runs / "r"


def test_train_refuses_to_start_over_a_trained_run_without_overwrite(tmp_path, capsys):
    args = ["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert main(args) == 0
    (tmp_path / "r" / "eval_scenes_val.json").write_text("{}")
    capsys.readouterr()
    assert main([*args, "--lr", "0.01"]) == 2
    assert "already holds a trained run (checkpoint.pt); pass --resume" in capsys.readouterr().err
    assert main([*args, "--lr", "0.01", "--overwrite"]) == 0
    assert not (tmp_path / "r" / "eval_scenes_val.json").exists()       # the earlier model's evaluation is gone
    assert json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == 0.01
    # a run continued with --resume saves resume=true; --overwrite still starts it again
    config = str(tmp_path / "r" / "config.json")
    assert main(["train", "--config", config, "--resume", "--set", "iters=3", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["resume"] is True
    assert main(["train", "--config", config, "--overwrite", "--set", "iters=2", "--no-progress"]) == 0
    import torch
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["step"] == 2
    capsys.readouterr()
    assert main(["train", "--config", config, "--resume", "--overwrite"]) == 2
    assert "--resume continues a run and --overwrite starts it again" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{'lr': 1}", "is not valid JSON: Expecting property name"),
    ("[1, 2]", "must hold a JSON object of TrainConfig fields, got a list"),
])
def test_train_names_a_bad_config_file(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert main(["train", "--config", str(tmp_path), "--print-config"]) == 2
    assert "--config must be a JSON file, got the directory" in capsys.readouterr().err


def test_a_path_that_is_a_file_gives_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(["train", *TINY, "--out-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmmseg train: error:") and "Traceback" not in err


def test_a_terminated_training_says_where_its_checkpoint_is(monkeypatch, capsys):
    import gmmseg_core.train as train_module

    def terminated(cfg):
        err = SystemExit(143)
        err.detail = "training stopped after step 3; its checkpoint is in 'x'"
        raise err

    monkeypatch.setattr(train_module, "train", terminated)
    with pytest.raises(SystemExit) as info:
        main(["train", *TINY])
    assert info.value.code == 143
    assert "gmmseg train: terminated: training stopped after step 3" in capsys.readouterr().err
