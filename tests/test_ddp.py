"""DistributedDataParallel on CPU: two gloo processes train the GMM model as one process on the global batch.

The training set is a single image, so each process's batch statistics (BatchNorm) equal those of the global
batch and DDP must reproduce the one-process run up to float rounding; how batches are sharded across
processes is tested in test_train.py (``_StepBatches``).
"""

import contextlib
import csv
import datetime
import json
import os
import random
import re
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmmseg_core import cli
from gmmseg_core.config import TrainConfig
from gmmseg_core.train import is_finished, train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def _cfg(out_dir, batch_size, run_name):
    return TrainConfig(arch="fcn", head="gmm", iters=3, batch_size=batch_size, model_kwargs=dict(width=4),
                       head_kwargs=dict(embed_dim=4, num_components=2, update_interval=1),
                       dataset_kwargs=dict(image_size=32, num_images=1), val_dataset_kwargs=dict(num_images=2),
                       out_dir=str(out_dir), run_name=run_name, progress=False)


def _save_head(path):
    def on_step(step, model, outputs):
        if step == 3:
            torch.save({k: v.clone() for k, v in model.head.state_dict().items()}, path)
    return on_step


def _worker(rank, world, port, out_dir, launch):
    torch.set_num_threads(1)
    if launch == "torchrun":        # the environment torchrun sets; train() makes the process group
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    else:                           # the caller's own process group, no environment: train() must join it
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(name, None)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train(_cfg(out_dir, batch_size=1, run_name="ddp"),
                  on_step=_save_head(os.path.join(out_dir, f"rank{rank}.pt")))
        with open(os.path.join(out_dir, f"warnings{rank}.txt"), "w") as f:
            f.write("\n".join(str(w.message) for w in seen))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("launch", ["torchrun", "own group"])
def test_two_gloo_processes_match_one_process(tmp_path, launch):
    # fork: the children inherit the imported modules instead of importing torch again
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), launch), nprocs=2, join=True,
                       start_method="fork")
    heads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # every process ends with the same GMM (gathered E-step, memory and M-step); BatchNorm running statistics
    # are per process between DDP's buffer broadcasts, so they are left out
    gmm_keys = [k for k in heads[0] if not k.startswith(("embed.", "embed_norm.", "class_normalizer."))]
    assert {"means", "variances", "memory", "memory_count"} <= set(gmm_keys)
    for key in gmm_keys:
        assert torch.equal(heads[0][key], heads[1][key]), key
    assert int(heads[0]["num_updates"]) == 3 and int(heads[0]["memory_count"].sum()) > 0
    # DDP neither copies the embedding's gradient into its buckets (strides) nor is called in a deprecated way
    for rank in range(2):
        text = (tmp_path / f"warnings{rank}.txt").read_text()
        assert "Grad strides do not match" not in text and "deprecated" not in text, text

    single_cfg = _cfg(tmp_path, batch_size=2, run_name="single")
    single = train(single_cfg, on_step=_save_head(tmp_path / "single.pt"))
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(single)
    assert len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    ref = torch.load(tmp_path / "single.pt")
    for key in ("means", "variances"):
        torch.testing.assert_close(heads[0][key], ref[key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "checkpoint.pt").exists() and (tmp_path / "ddp" / "metrics.json").exists()


def _failed_set_up_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with pytest.raises(FileNotFoundError, match="cityscapes: no 'leftImg8bit' found"):
        train(_cfg(out_dir, batch_size=1, run_name="missing").replace(dataset="cityscapes",
                                                                      data_root=os.path.join(out_dir, "none")))
    assert not dist.is_initialized()     # a later train() in this process makes its own group again


def test_a_set_up_failure_under_torchrun_leaves_no_process_group(tmp_path):
    mp.start_processes(_failed_set_up_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")


TINY_CLI = ["--iters", "2", "--batch-size", "1", "--set", "model_kwargs.width=4", "--set", "head_kwargs.embed_dim=4",
            "--set", "head_kwargs.num_components=2", "--set", "dataset_kwargs.image_size=32",
            "--set", "dataset_kwargs.num_images=1", "--set", "val_dataset_kwargs.num_images=2"]


def _cli_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    base = os.path.join(out_dir, f"rank{rank}")
    with open(base + ".out", "w") as out, open(base + ".err", "w") as err, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        statuses = [cli.main(["train", *TINY_CLI, "--out-dir", out_dir, "--run-name", "r", "--resume"]),
                    cli.main(["train", "--out-dir", out_dir, "--run-name", "r", "--resume", "--overwrite"])]
    assert statuses == [0, 2]


def test_under_torchrun_only_rank_0_reports_and_every_rank_reports_its_errors(tmp_path):
    mp.start_processes(_cli_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    out = [(tmp_path / f"rank{r}.out").read_text() for r in range(2)]
    err = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert re.search(r"final: mIoU [\d.]+ .*\nrun directory: .*r\n$", out[0])
    notice, bar = "to resume: training from step 0", "it/s]"
    assert notice in err[0] and bar in err[0]
    assert out[1] == "" and notice not in err[1] and bar not in err[1]
    for text in err:
        assert "gmmseg train: error: --resume continues a run and --overwrite starts it again" in text


def _own_group_worker(rank, world, port, out_dir, timeout_s, body):
    torch.set_num_threads(1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        body(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _run_in_two_processes(body, out_dir, timeout_s=60):
    mp.start_processes(_own_group_worker, args=(2, _free_port(), str(out_dir), timeout_s, body), nprocs=2,
                       join=True, start_method="fork")


def _slow_evaluation(rank, out_dir):
    from gmmseg_core import evaluate

    closed_set = evaluate.evaluate_closed_set

    def slow(*args, **kwargs):
        time.sleep(3)
        return closed_set(*args, **kwargs)

    evaluate.evaluate_closed_set = slow         # a fork of the test process: nothing to undo
    train(_cfg(out_dir, batch_size=1, run_name="slow").replace(iters=1))


def test_the_other_processes_wait_for_an_evaluation_longer_than_the_groups_timeout(tmp_path):
    # rank 0 evaluates alone; a full validation on one GPU can outlast the group's collective timeout (NCCL: 10 min)
    _run_in_two_processes(_slow_evaluation, tmp_path, timeout_s=2)
    assert json.loads((tmp_path / "slow" / "metrics.json").read_text())["finished"]


def _slow_final_metrics_on_rank_0(rank):
    from gmmseg_core import train as train_module

    write_json = train_module._write_json

    def slow(path, obj):
        if rank == 0 and path.name == "metrics.json" and obj["finished"]:
            time.sleep(0.5)
        write_json(path, obj)

    train_module._write_json = slow             # a fork of the test process: nothing to undo


def _slow_final_metrics(rank, out_dir):
    _slow_final_metrics_on_rank_0(rank)
    run_dir = train(_cfg(out_dir, batch_size=1, run_name="done").replace(iters=1))
    assert is_finished(run_dir)          # on every process, as soon as train() returns


def test_every_process_returns_once_the_run_is_complete_on_disk(tmp_path):
    _run_in_two_processes(_slow_final_metrics, tmp_path)


def _resume_an_ending_killed_before_its_metrics(rank, out_dir):
    cfg = _cfg(out_dir, batch_size=1, run_name="done").replace(iters=1)
    run_dir = train(cfg)
    if rank == 0:
        (run_dir / "metrics.json").unlink()     # killed between the final checkpoint and metrics.json
    dist.barrier()
    _slow_final_metrics_on_rank_0(rank)
    train(cfg.replace(resume=True))             # rank 0 writes the missing metrics.json
    assert is_finished(run_dir)


def test_every_process_returns_once_a_resumed_finished_run_is_complete_on_disk(tmp_path):
    _run_in_two_processes(_resume_an_ending_killed_before_its_metrics, tmp_path)


def _draw_per_rank(out_dir, name):
    # a stand-in for a model drawing a rank-dependent count of random numbers: the processes' streams diverge
    def on_step(step, model, outputs):
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(Path(out_dir) / f"{name}{rank}.txt", "a") as f:
            f.write(f"{step} {torch.rand(1).item()!r} {np.random.rand()!r} {random.random()!r}\n")
        torch.rand(rank + 1), np.random.rand(rank + 1), [random.random() for _ in range(rank + 1)]
    return on_step


def _draws(out_dir, name, rank):
    return (out_dir / f"{name}{rank}.txt").read_text().splitlines()


def _resumable_cfg(out_dir, run_name):
    return _cfg(out_dir, batch_size=1, run_name=run_name).replace(iters=4, checkpoint_interval=2)


def _train_whole_and_part(rank, out_dir):
    train(_resumable_cfg(out_dir, "whole"), on_step=_draw_per_rank(out_dir, "whole"))
    train(_resumable_cfg(out_dir, "part"), stop_after=2, on_step=_draw_per_rank(out_dir, "part"))


def _resume_part(rank, out_dir):
    with pytest.warns(UserWarning, match=r"written by 1 process\(es\) and 2 resume it: the global batch changes "
                                         r"from 1 to 2 images, and every process restores the random states rank 0 saved") \
            if rank == 0 else contextlib.nullcontext():
        train(_resumable_cfg(out_dir, "part").replace(resume=True), on_step=_draw_per_rank(out_dir, "part"))


def test_a_resumed_run_continues_the_random_streams_of_every_process(tmp_path):
    def interrupted_and_uninterrupted(rank, out_dir):
        _train_whole_and_part(rank, out_dir)
        train(_resumable_cfg(out_dir, "part").replace(resume=True), on_step=_draw_per_rank(out_dir, "part"))

    _run_in_two_processes(interrupted_and_uninterrupted, tmp_path)
    for rank in range(2):
        assert _draws(tmp_path, "part", rank) == _draws(tmp_path, "whole", rank), rank
    assert _draws(tmp_path, "whole", 0)[3] != _draws(tmp_path, "whole", 1)[3]
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")


def test_a_checkpoint_of_another_number_of_processes_restores_rank_0s_random_states(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # two processes' checkpoint, one process resumes it: rank 0's streams continue
    _run_in_two_processes(_train_whole_and_part, two)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) and 1 resume it: the global batch changes "
                                         r"from 2 to 1 images"):
        train(_resumable_cfg(two, "part").replace(resume=True), on_step=_draw_per_rank(two, "part"))
    assert _draws(two, "part", 0) == _draws(two, "whole", 0)
    # one process's checkpoint, two processes resume it: both continue its streams
    _train_whole_and_part(0, one)
    _run_in_two_processes(_resume_part, one)
    assert _draws(one, "part", 0) == _draws(one, "whole", 0)
    assert _draws(one, "part", 1)[0] == _draws(one, "whole", 0)[2]


def _refused_worker(rank, world, port, out_dir):
    from gmmseg_core._files import DirectoryInUseError

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        train(_cfg(out_dir, batch_size=1, run_name="ddp"))
    except DirectoryInUseError as err:
        with open(os.path.join(out_dir, f"refused{rank}.txt"), "w") as f:
            f.write(str(err))


def test_every_rank_stops_when_another_training_holds_the_run_directory(tmp_path):
    from gmmseg_core._files import DirectoryLock

    with DirectoryLock(tmp_path / "ddp"):               # only rank 0 locks: the others learn it from rank 0
        mp.start_processes(_refused_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                           start_method="fork")
    for rank in range(2):
        refusal = (tmp_path / f"refused{rank}.txt").read_text()
        assert f"'{tmp_path / 'ddp'}' is in use by process {os.getpid()} " in refusal
    assert not (tmp_path / "ddp").exists()              # nothing was written there (the lock's folder is gone)


def _blocked_run_directory(rank, out_dir):
    blocked = os.path.join(out_dir, "a_file")
    if rank == 0:
        open(blocked, "w").close()
    dist.barrier()
    with pytest.raises(OSError, match=f"Not a directory: '{blocked}/ddp'"):
        train(_cfg(blocked, batch_size=1, run_name="ddp"))


def test_every_rank_stops_when_rank_0_cannot_make_the_run_directory(tmp_path):
    # rank 0's error reaches the others at once, not once its process ends (a caller's group outlives train())
    _run_in_two_processes(_blocked_run_directory, tmp_path)


def _fail_on_rank_0(what):
    def body(rank, out_dir):
        from gmmseg_core import evaluate
        from gmmseg_core import train as train_module

        error = RuntimeError if what == "evaluation" else OSError       # out of memory; a full disk

        def fail(*args, **kwargs):
            raise error("deliberate failure")

        if rank == 0:           # a fork of the test process: nothing to undo
            if what == "evaluation":
                evaluate.evaluate_closed_set = fail
            else:
                train_module.atomic_write = fail
        with pytest.raises(error, match="deliberate failure") as info:
            train(_cfg(out_dir, batch_size=1, run_name="failed").replace(iters=1))
        assert type(info.value) is error
        assert rank == 0 or str(info.value) == (f"rank 0 failed, so this process stops too: {error.__name__}: "
                                                "deliberate failure")
    return body


@pytest.mark.parametrize("what", ["evaluation", "checkpoint"])
def test_when_rank_0_fails_alone_every_process_stops_at_once(tmp_path, what):
    # not only once rank 0's process ends: a caller's process group outlives train()
    _run_in_two_processes(_fail_on_rank_0(what), tmp_path)
