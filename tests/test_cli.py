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
    for word in ("train", "evaluate", "predict", "reproduce", "bench", "examples:"):
        assert word in out
    assert main([]) == 1  # no command: help, failure status
    for command in ("train", "evaluate", "predict", "reproduce", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: gmmseg " + command in capsys.readouterr().out


def test_evaluate_help_says_where_another_dataset_is_read_from(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the training run's for its own dataset, $GMMSEG_DATA or ./data for another one" in help_text


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


def test_evaluating_a_run_still_training_says_so_and_marks_its_results(tmp_path, capsys):
    from gmmseg_core.config import TrainConfig
    from gmmseg_core.train import train

    args = ["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
            "--run-name", "r", "--iters", "3", "--checkpoint-interval", "1"]
    run_dir = tmp_path / "r"
    evaluated = []

    def evaluate_meanwhile(step, model, outputs):        # as `gmmseg evaluate` from another shell
        if step == 2:
            evaluated.append(main(["evaluate", str(run_dir), "--no-progress"]))

    assert main([*args, "--print-config"]) == 0
    cfg = TrainConfig.from_json(capsys.readouterr().out)
    train(cfg, on_step=evaluate_meanwhile)
    assert evaluated == [0]
    assert f"note: the run in {str(run_dir)!r} is not finished (still training" in capsys.readouterr().err
    assert json.loads((run_dir / "eval_scenes_val.json").read_text())["options"]["run_finished"] is False
    assert main(["evaluate", str(run_dir), "--no-progress"]) == 0
    assert "not finished" not in capsys.readouterr().err
    assert json.loads((run_dir / "eval_scenes_val.json").read_text())["options"]["run_finished"] is True


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
                                       keep_going=False, resume=False, progress=True))]
    assert main(["reproduce", "--no-progress"]) == 0 and calls[-1][1]["progress"] is False
    assert main(["reproduce", "--resume"]) == 0 and calls[-1][1]["resume"] is True


def test_reproduce_set_overrides_notebook_parameters(monkeypatch, capsys):
    import gmmseg_core.reproduce as rep

    calls = []
    monkeypatch.setattr(rep, "reproduce", lambda *args, **kw: calls.append(kw) or {})
    assert main(["reproduce", "--profile", "cpu", "--set", "train_processes=4", "--set", "seeds=[0]",
                 "--set", "arch=segformer"]) == 0
    assert calls[0]["parameters"] == {"train_processes": 4, "seeds": [0], "arch": "segformer"}
    assert main(["reproduce", "--set", "head_kwargs.variant=official"]) == 2
    assert capsys.readouterr().err.startswith("gmmseg reproduce: error: --set names a notebook parameter (a Python "
                                              "name), got ['head_kwargs.variant']")


def test_reproduce_reports_a_failing_notebook_without_a_traceback(monkeypatch, capsys):
    import gmmseg_core.reproduce as rep

    def fail(*args, **kw):
        raise rep.NotebookExecutionError("notebooks/03_closed_set.ipynb", "out/03.ipynb", 4, "ValueError", "bad")

    monkeypatch.setattr(rep, "reproduce", fail)
    assert main(["reproduce", "--profile", "smoke"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gmmseg reproduce: error:")   # as the other subcommands say it
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


def test_every_train_flag_reaches_its_config_field(tmp_path, capsys):
    flags = {"--arch": ("arch", "segformer"), "--head": ("head", "softmax"), "--dataset": ("dataset", "digits"),
             "--data-root": ("data_root", str(tmp_path)), "--iters": ("iters", 7), "--batch-size": ("batch_size", 3),
             "--lr": ("lr", 0.25), "--head-lr-mult": ("head_lr_mult", 4.0), "--weight-decay": ("weight_decay", 0.5),
             "--warmup-iters": ("warmup_iters", 2), "--grad-clip": ("grad_clip", 1.5), "--amp": ("amp", "bf16"),
             "--eval-interval": ("eval_interval", 3), "--checkpoint-interval": ("checkpoint_interval", 4),
             "--seed": ("seed", 11), "--device": ("device", "cuda:1"), "--num-workers": ("num_workers", 2),
             "--out-dir": ("out_dir", str(tmp_path / "runs")), "--run-name": ("run_name", "named")}
    args = [str(a) for flag, (_, value) in flags.items() for a in (flag, value)]
    assert main(["train", *args, "--balanced-sampler", "--resume", "--no-progress", "--image-size", "24",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert {field: cfg[field] for field, _ in flags.values()} == dict(flags.values())
    assert (cfg["balanced_sampler"], cfg["resume"], cfg["progress"]) == (True, True, False)
    assert cfg["dataset_kwargs"] == {"image_size": 24}
    assert main(["train", "--print-config"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert (default["balanced_sampler"], default["resume"], default["progress"]) == (False, False, True)


def test_evaluate_passes_its_options_to_the_evaluation(tmp_path, monkeypatch, capsys):
    import gmmseg_core.evaluate as evaluate_module
    from gmmseg_core.data import build_dataset

    assert main(["train", *TINY, "--out-dir", str(tmp_path), "--run-name", "g"]) == 0
    calls = {}

    def record(name, result):
        def fake(model, dataset, **kw):
            calls[name] = dict(kw, num_images=len(dataset), dataset_split=dataset.split)
            return result
        return fake

    scores = {"auroc": 0.5, "ap": 0.5, "fpr95": 0.5, "curves": {}}
    monkeypatch.setattr(evaluate_module, "evaluate_anomaly", record("anomaly", {"msp": scores, "sml": scores}))
    monkeypatch.setattr(evaluate_module, "collect_sml_statistics", record("sml", {}))
    assert main(["evaluate", str(tmp_path / "g"), "--split", "anomaly", "--scorers", "msp", "sml", "--streaming",
                 "--sml-images", "3", "--mode", "slide", "--crop-size", "16", "--stride", "8", "--batch-size", "5",
                 "--no-progress"]) == 0
    anomaly, sml = calls["anomaly"], calls["sml"]
    assert (anomaly["mode"], anomaly["crop_size"], anomaly["stride"], anomaly["batch_size"]) == ("slide", 16, 8, 5)
    assert anomaly["streaming"] is True and anomaly["scorers"] == ["msp", "sml"]
    # the anomaly split keeps its own size (the run's num_images is the training split's); sml reads training data
    assert anomaly["num_images"] == len(build_dataset("scenes", "anomaly", image_size=32))
    assert (sml["dataset_split"], sml["num_images"], sml["max_images"], sml["mode"]) == ("train", 4, 3, "slide")
    assert main(["evaluate", str(tmp_path / "g"), "--split", "anomaly", "--scorers", "sml", "--sml-images", "0",
                 "--no-progress"]) == 0
    assert calls["sml"]["max_images"] is None and calls["anomaly"]["streaming"] is False


def test_a_config_file_names_a_run_only_when_it_lies_in_that_run(tmp_path, capsys):
    from gmmseg_core.config import TrainConfig

    own = tmp_path / "project" / "config.json"            # a config file of its own, in a folder of any name
    own.parent.mkdir()
    TrainConfig(out_dir=str(tmp_path / "runs")).to_json(own)
    assert main(["train", "--config", str(own), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["out_dir"], cfg["run_name"]) == (str(tmp_path / "runs"), None)
    run = tmp_path / "runs" / "r" / "config.json"         # a run's own config.json: that run, unless told otherwise
    run.parent.mkdir(parents=True)
    TrainConfig(out_dir="elsewhere", run_name="r").to_json(run)
    assert main(["train", "--config", str(run), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["out_dir"] == str(tmp_path / "runs")
    assert main(["train", "--config", str(run), "--out-dir", str(tmp_path / "new"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["out_dir"], cfg["run_name"]) == (str(tmp_path / "new"), "r")
    assert main(["train", "--config", str(run), "--run-name", "variant", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)                 # a new run, where the file says runs go
    assert (cfg["out_dir"], cfg["run_name"]) == ("elsewhere", "variant")


def test_evaluate_refuses_a_stride_without_slide_mode(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "not-read"), "--stride", "8"]) == 2
    assert "--crop-size and --stride apply to --mode slide" in capsys.readouterr().err


def test_evaluate_reads_another_dataset_from_its_own_root_not_the_runs(tmp_path, monkeypatch, capsys):
    import types

    import gmmseg_core.data as data_module
    import gmmseg_core.train as train_module
    from gmmseg_core.config import TrainConfig

    run_cfg = TrainConfig(dataset="fashion", data_root=str(tmp_path / "fashion"),
                          dataset_kwargs={"transform": {"crop_size": 24}})
    monkeypatch.setattr(train_module, "load_run", lambda run_dir, device=None: (object(), run_cfg, {}))
    calls = []

    def build_dataset(name, split, root=None, **kw):
        calls.append((name, split, root, "transform" in kw))
        if split == "anomaly" and name == "fashion":          # on to the sml statistics' training split
            return types.SimpleNamespace(is_anomaly_split=True)
        raise ValueError("stop here")

    monkeypatch.setattr(data_module, "build_dataset", build_dataset)
    moved = str(tmp_path / "moved")
    for args in (["--dataset", "scenes", "--split", "anomaly"], ["--split", "val"],
                 ["--dataset", "scenes", "--data-root", str(tmp_path / "other")],
                 ["--split", "anomaly", "--data-root", moved]):
        assert main(["evaluate", str(tmp_path / "run"), *args]) == 2
    assert calls == [("scenes", "anomaly", None, False), ("fashion", "val", str(tmp_path / "fashion"), False),
                     ("scenes", "val", str(tmp_path / "other"), False), ("fashion", "anomaly", moved, False),
                     ("fashion", "train", moved, False)]      # never augmented


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch, capsys):
    # the run's config.json is read again from other directories (evaluate, resume)
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data-root", "data", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data_root"] == str(tmp_path.resolve() / "data")


def test_the_command_and_its_help_need_no_torch():
    # --help answers at once, and a Ctrl-C while the command starts stops it without a traceback from torch's import
    code = ("import sys; from gmmseg_core.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_names_a_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["train", "--config", str(missing), "--print-config"]) == 2
    assert f"--config {str(missing)!r} does not exist; expected a JSON file" in capsys.readouterr().err


def test_a_full_disk_while_checkpointing_gives_a_one_line_error(tmp_path, monkeypatch, capsys):
    import torch

    def full_disk(obj, f, *args, **kwargs):      # how torch.save reports a full disk
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
                 "--run-name", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gmmseg train: error: cannot write {str(tmp_path / 'r' / 'checkpoint.pt')!r} (is the "
                          "disk full?)") and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.pt.tmp").exists()


def test_reproduce_stopped_while_saving_keeps_the_previous_figure_and_table(tmp_path, monkeypatch):
    import csv

    import matplotlib.pyplot as plt

    from gmmseg_core.plots import savefig, write_table

    fig = plt.figure()
    png = savefig(fig, tmp_path, "f")
    md, table = write_table([{"a": 1}], ["a"], tmp_path, "t")
    before = {p: p.read_bytes() for p in (png, md, table)}

    def stopped(self, fname, **kwargs):          # the kernel is killed half-way through the PNG
        with open(fname, "wb") as f:
            f.write(before[png][:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(fig), "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        savefig(fig, tmp_path, "f")

    def full_disk(self, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerow", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        write_table([{"a": 2}], ["a"], tmp_path, "t")
    plt.close(fig)
    assert png.read_bytes() == before[png] and table.read_bytes() == before[table]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "t.csv", "t.md"]


def test_bench_stopped_while_writing_results_keeps_results_md_whole(tmp_path, monkeypatch):
    from pathlib import Path

    from benchmarks.results import write_section

    results = tmp_path / "RESULTS.md"
    write_section("a", "first", results)
    before = results.read_text()
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):       # half the text, then the disk is full
        real_write_text(self, text[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        write_section("b", "second", results)
    monkeypatch.undo()
    assert results.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]


def test_reproduce_shows_the_running_notebooks_progress_over_its_cells(tmp_path, capsys):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("out_dir = None\nfigures_dir = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("y = x + 1")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "long_study.ipynb")
    args = ["reproduce", "--profile", "smoke", "--notebooks", str(tmp_path / "long_study.ipynb"),
            "--out-dir", str(tmp_path / "out"), "--figures-dir", str(tmp_path / "fig")]
    assert main(args) == 0
    err = capsys.readouterr().err        # a notebook can run for hours between its start and end lines
    assert "long_study:" in err and "/4 [" in err and "cell" in err
    assert main([*args, "--no-progress"]) == 0
    assert "long_study:" not in capsys.readouterr().err


def test_resuming_a_finished_run_says_that_nothing_was_trained(tmp_path, capsys):
    args = ["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert f"the run in {str(tmp_path / 'r')!r} was already finished at step 2: nothing trained" in \
        capsys.readouterr().err
    assert main([*args, "--resume", "--iters", "3"]) == 0              # continued: trained from its checkpoint
    err = capsys.readouterr().err
    assert "already finished" not in err
    assert f"resuming the run in {str(tmp_path / 'r')!r} from its checkpoint at step 2 of 3" in err
    assert main(args) == 2 and "from its checkpoint" not in capsys.readouterr().err   # no --resume: refused


def test_train_in_a_run_directory_another_training_holds_fails_at_once_and_changes_nothing(tmp_path, capsys):
    import os

    from gmmseg_core._files import DirectoryLock

    args = ["train", *TINY, "--head", "softmax", "--set", "head_kwargs={}", "--out-dir", str(tmp_path),
            "--run-name", "r"]
    assert main(args) == 0
    checkpoint = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    with DirectoryLock(tmp_path / "r"):                  # as a training running there would
        for extra in ([], ["--overwrite"], ["--resume", "--iters", "3"]):     # in use, before "already trained"
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"gmmseg train: error: the directory '{tmp_path / 'r'}' is in use by process "
                                  f"{os.getpid()} on host ")
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == checkpoint
