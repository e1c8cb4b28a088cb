"""DistributedDataParallel on CPU: two gloo processes train the GMM model as one process on the global batch.

The training set is a single image, so each process's batch statistics (BatchNorm) equal those of the global
batch and DDP must reproduce the one-process run up to float rounding; how batches are sharded across
processes is tested in test_train.py (``_StepBatches``).
"""

import csv
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmmseg_core.config import TrainConfig
from gmmseg_core.train import train

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
        train(_cfg(out_dir, batch_size=1, run_name="ddp"),
              on_step=_save_head(os.path.join(out_dir, f"rank{rank}.pt")))
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

    single_cfg = _cfg(tmp_path, batch_size=2, run_name="single")
    single = train(single_cfg, on_step=_save_head(tmp_path / "single.pt"))
    ddp_losses, single_losses = _losses(tmp_path / "ddp"), _losses(single)
    assert len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)
    ref = torch.load(tmp_path / "single.pt")
    for key in ("means", "variances"):
        torch.testing.assert_close(heads[0][key], ref[key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "ddp" / "checkpoint.pt").exists() and (tmp_path / "ddp" / "metrics.json").exists()


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
