"""The online-hybrid training loop: cross-entropy into the feature extractor, EM bookkeeping into the GMM head.

``train(cfg)`` reads top to bottom: set-up (distributed, seeds, data, model, optimiser, resume), then the loop
(forward, backward, optimiser step, log, head update for a finite step, evaluate, checkpoint). Single process by
default; under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment), or inside a process
group the caller has initialised, it runs DistributedDataParallel (a group it creates itself: gloo on CPU, NCCL on
CUDA) with ``cfg.batch_size`` images per process. Only rank 0 evaluates and writes files; the other processes
wait for it in a gloo group of their own, for up to ``WAIT_FOR_RANK_0`` whatever the default group's timeout (NCCL's
is 10 minutes, and a full validation on one GPU can take about as long), and stop with an error naming rank 0's
when it fails there.

Run directory (``cfg.run_dir``)::

    config.json      the TrainConfig
    log.csv          one row per step: step, loss, ce, aux, lr, grad_norm, step_time_s
    metrics.json     {"evals": [{"step", "miou", ...}, ...], "final": {...}, "finished": bool,
                     "train_time_s": wall time of every segment of the run, evaluations included, ...}
    checkpoint.pt    model, optimiser, scheduler, grad scaler, step, RNG states (of every process), data position
    train.lock       while a training runs: its pid, host and start time

One training at a time per run directory: rank 0 holds an ``fcntl.flock`` lock on ``train.lock`` from before it
reads the checkpoint until it returns, and a second training there (``train``, ``train_cached``, ``gmmseg train``,
resumed or not) fails at once naming the directory and that process. The operating system drops the lock when its
process ends, however it ends, so a directory left by a crashed or killed run (whose ``train.lock`` stays) is free.
Without ``fcntl`` (Windows) nothing is locked.

The JSON files and the checkpoint are written atomically (a temporary file, then ``os.replace``): a kill or a full
disk leaves each whole, old or new, and the next training there deletes the temporary file a kill left behind.
``log.csv`` is appended to; a resume drops its rows past the checkpoint and a row a kill tore.

Determinism and resume: the data order is a pure function of (seed, step): the image stream is the
concatenation of epoch-seeded permutations (or class-balanced epochs), step ``s`` of a run with global batch
``G`` takes positions ``[s G, (s + 1) G)``, and each image's augmentation is drawn from a generator seeded by
its position. So ``resume=True`` needs only the step count to continue exactly where the run stopped; with the
restored model, optimiser, scheduler and RNG states the resumed run is bit-for-bit the uninterrupted one on a
CPU at the same thread count. On CUDA it is the same up to rounding, as two uninterrupted runs are: some kernels
there (the bilinear upsampling's backward, the cross-entropy's reduction) add with atomics, in an order that
varies. Evaluation runs under a forked RNG so it never shifts the training stream. Under DDP each process resumes
its own RNG streams when as many processes resume the run as wrote its checkpoint; otherwise (and from a one-process
checkpoint) every process restores the states rank 0 saved, and a warning says that the global batch changed.
A checkpoint belongs to its configuration: resuming it under another (other than ``RESUME_MAY_CHANGE``) is refused.

Interrupts (one process, main thread): Ctrl-C or SIGTERM lets the current step finish, writes a checkpoint of it,
then raises ``KeyboardInterrupt`` (SIGTERM: ``SystemExit(143)``), so nothing trained is lost; a second signal
acts at once.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
import warnings
import zipfile
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from packaging.version import Version
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from gmmseg_core._checks import check_int
from gmmseg_core._files import (
    DirectoryInUseError,
    DirectoryLock,
    atomic_write,
    atomic_write_text,
    progress_bar,
    temporary_path,
)
from gmmseg_core.config import TrainConfig, without_data_cache_dirs

__all__ = ["TrainConfig", "train", "load_run", "train_cached", "build_model_from_spec", "dataset_kwargs_for"]

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "metrics.json", "config.json", "log.csv")    # those a training replaces with atomic_write
NONFINITE_FP16_STEPS = 10  # with fp16 autocast, consecutive non-finite losses before training stops
WAIT_FOR_RANK_0 = timedelta(hours=2)  # under DDP, how long the other processes wait while rank 0 evaluates or saves


# ------------------------------------------------------------------------------------------------ helpers
class _TrainStep(nn.Module):
    """``forward = model.forward_train`` so DistributedDataParallel sees the training pass as its forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return self.model.forward_train(images, labels)


class _PositionedDataset(Dataset):
    """Item ``(index, seed)`` -> ``dataset[index]`` with torch's RNG seeded by ``seed`` (augmentations become a
    function of the stream position, whatever the worker count, and the global RNG is left untouched)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also reseed (and, once initialised, move) the
            # CUDA generators of the training process, at ~1 ms per item
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def _collate_training_batch(items):
    """``default_collate`` of ``(image (3, H, W), label (H, W))`` items, refusing images of different sizes with
    a ValueError that says how to give them one (a real dataset read at its native sizes, such as ADE20K)."""
    sizes = sorted({tuple(image.shape[-2:]) for image, _ in items})
    if len(sizes) > 1:
        raise ValueError(f"a training batch mixes image sizes {sizes} (height, width): give the dataset one size "
                         "with dataset_kwargs.image_size (--image-size) or a cropping augmentation with "
                         "dataset_kwargs.transform (e.g. --set 'dataset_kwargs.transform={\"crop_size\": 512}')")
    return default_collate(items)


class _StepBatches:
    """Batch sampler over an infinite, epoch-seeded image stream; batch ``s`` is fully determined by ``s``.

    Position ``p`` of the stream is image ``perm_e[p % L]`` of epoch ``e = p // L`` (``L`` images per epoch);
    process ``rank`` of ``world`` takes positions ``s G + rank b .. s G + (rank + 1) b - 1`` of step ``s``
    (``b`` images per process, ``G = world b``), so one process with batch ``G`` sees the same images.
    """

    def __init__(self, dataset, batch_size, seed, start_step, num_steps, rank=0, world=1, balanced=False):
        self.dataset, self.b, self.seed = dataset, batch_size, seed
        self.start, self.stop = start_step, num_steps
        self.rank, self.world = rank, world
        self.sampler = _balanced_sampler(dataset, seed) if balanced else None
        self.epoch_length = len(self.sampler) if self.sampler is not None else len(dataset)
        if self.epoch_length < 1:
            raise ValueError("the training dataset is empty")
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k >= e - 1}
            if self.sampler is not None:
                if hasattr(self.sampler, "set_epoch"):
                    self.sampler.set_epoch(e)
                self._cache[e] = [int(i) for i in self.sampler]
            else:
                g = torch.Generator().manual_seed(self.seed * 100_003 + e)
                self._cache[e] = torch.randperm(self.epoch_length, generator=g).tolist()
        return self._cache[e]

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = step * self.b * self.world + self.rank * self.b
        out = []
        for p in range(first, first + self.b):
            e, o = divmod(p, self.epoch_length)
            out.append((self._epoch(e)[o], (self.seed * 1_000_003 + p) % 2 ** 62))
        return out

    def __len__(self):
        return max(self.stop - self.start, 0)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.batch(step)


def _balanced_sampler(dataset, seed):
    """The class-balanced draw of the whole global batch stream: ``_StepBatches`` shards it across processes
    itself, so the sampler must not shard it again under DDP."""
    from gmmseg_core.data.sampler import ClassBalancedSampler

    return ClassBalancedSampler(dataset, seed=seed, rank=0, world_size=1)


def build_model_from_spec(spec: dict) -> nn.Module:
    """``build_model(arch, head=..., num_classes=..., head_kwargs..., model_kwargs...)`` from a saved spec."""
    from gmmseg_core.models import build_model

    return build_model(spec["arch"], head=spec["head"], num_classes=spec["num_classes"],
                       head_kwargs=spec.get("head_kwargs") or {}, **spec.get("model_kwargs", {}))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _launched_rank() -> int | None:
    """The rank ``torchrun`` gave this process (its ``RANK`` variable), None when it was not started so."""
    rank = os.environ.get("RANK")
    return None if rank is None else int(rank)


def _rng_states(host, rank: int, world: int) -> list[dict] | None:
    """Every process's ``_rng_state()`` in rank order, gathered on rank 0 over ``host`` (None on the other ranks);
    ``[_rng_state()]`` without DDP (``host`` None)."""
    state = _rng_state()
    if host is None:
        return [state]
    states = [None] * world if rank == 0 else None
    dist.gather_object(state, states, dst=0, group=host)
    return states


def _saved_rng_state(ckpt: dict, rank: int, world: int) -> dict:
    """The RNG states process ``rank`` of ``world`` resumes with: its own when the checkpoint was written by as many
    processes, rank 0's otherwise (a one-process checkpoint, or one written by another number of processes)."""
    per_rank = ckpt.get("rank_rng")
    return per_rank[rank] if per_rank is not None and len(per_rank) == world else ckpt["rng"]


def _no_buffer_sync() -> dict:
    """DistributedDataParallel's keyword that turns off the buffer broadcast before every forward.

    torch 2.14 deprecates ``broadcast_buffers`` for ``forward_sync_buffers``, which still broadcasts the buffers
    once when DDP is built: harmless here, since every process then holds the same buffers anyway (one seeded
    initialisation, or one checkpoint), and it costs one copy of the GMM memory per run instead of one per step.
    """
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters:
        return dict(forward_sync_buffers=False)
    return dict(broadcast_buffers=False)


def _host_group():
    """A gloo group of every process, for waiting on rank 0 and gathering RNG states.

    Its timeout is ``WAIT_FOR_RANK_0``, not the default group's (NCCL's 10 minutes, or what the caller gave it), and
    its waits run on the CPU, outside the NCCL watchdog.
    """
    return dist.new_group(backend="gloo", timeout=WAIT_FOR_RANK_0)


def _on_rank_0(master: bool, host, work) -> None:
    """``work()`` on rank 0 alone (evaluating, writing the run directory) while the other processes wait for it in
    ``host`` (the gloo group of :func:`_host_group`; None without DDP).

    A failure there raises on every process: rank 0's own exception on rank 0; on the others, which would otherwise
    wait for a rank 0 that has given up for as long as its process lives (a caller's process group outlives
    ``train``), up to ``WAIT_FOR_RANK_0``, an error naming it: an OSError for rank 0's OSError (a full disk), so
    that ``gmmseg train`` reports it on every process alike, a RuntimeError otherwise.
    """
    error = None
    if master:
        try:
            work()
        except Exception as err:
            error = err
    if host is not None:
        message = [None if error is None else (f"{type(error).__name__}: {error}", isinstance(error, OSError))]
        try:
            dist.broadcast_object_list(message, src=0, group=host)
        except Exception:
            if error is None:
                raise                       # else rank 0's own error says more than the failed broadcast of it
        if message[0] is not None and error is None:
            text, os_error = message[0]
            raise (OSError if os_error else RuntimeError)(f"rank 0 failed, so this process stops too: {text}")
    if error is not None:
        raise error


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per device index of the machine that saved them; a machine with fewer devices restores those it
        # has (set_rng_state_all would index past them and fail)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _eval_summary(metrics: dict) -> dict:
    keep = ("miou", "per_class_iou", "pixel_acc", "mean_acc", "ece", "num_images")
    return {k: metrics[k] for k in keep if k in metrics}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up ``(step + 1) / warmup_iters``, times poly decay.

    The released configs warm up with mmcv's linear rule, ``1 - (1 - step / warmup_iters) (1 - 1e-6)``: it starts
    at 1e-6 (a first step that barely moves the weights) and reaches the full rate one step later than this one.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters > 0 else 1.0
    return warm * max(0.0, 1.0 - step / cfg.iters) ** cfg.poly_power


# ------------------------------------------------------------------------------------------------ train
def _batches(loader, stop: _StopRequest):
    """The loader's batches; it ends early when a DataLoader worker died of a signal the loop is handling."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError:            # "DataLoader worker exited unexpectedly": Ctrl-C reaches workers too
            if stop.signal is None:
                raise
            return
        yield batch


class _StopRequest:
    """Once installed, the first SIGINT or SIGTERM only records a request to stop; a second one acts at once.

    The training loop checks ``signal`` between steps, writes a checkpoint of the last completed step and then
    stops, so an interrupted run loses nothing and resumes exactly. Handlers can only be set from the main
    thread; elsewhere (and under DDP, whose processes could see the signal at different steps) this does
    nothing and signals act as usual. A signal the process ignores (a background job's SIGINT) stays ignored.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:     # an ignored signal (nohup, `&`) stays ignored
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:       # asked twice: the previous behaviour, now
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def stop(self, step: int, run_dir: Path, finished: bool = False):
        """The exception that ends the run: KeyboardInterrupt for SIGINT, SystemExit(143) for SIGTERM."""
        where = (f"training finished (step {step}) before the stop took effect; the run is complete in "
                 f"{str(run_dir)!r}" if finished else
                 f"training stopped after step {step}; its checkpoint is in {str(run_dir)!r}: resume=True "
                 f"(gmmseg train --config {str(run_dir / 'config.json')!r} --resume) continues it")
        if self.signal == signal.SIGINT:
            return KeyboardInterrupt(where)
        err = SystemExit(128 + signal.SIGTERM)
        err.detail = where      # SystemExit's argument is the exit status: the command line prints this instead
        return err


def dataset_kwargs_for(cfg: TrainConfig, split: str) -> dict:
    """``build_dataset`` options of one split of a run: ``cfg.dataset_kwargs``, with ``val_dataset_kwargs`` on top
    for ``"val"``.

    ``dataset_kwargs["transform"]``, when given, is a dict of :func:`gmmseg_core.data.train_transforms` arguments
    (JSON, so it fits in ``config.json``; e.g. ``{"crop_size": [512, 1024], "scale": [2048, 1024]}`` for
    mmseg's Cityscapes pipeline): the training split gets that augmentation, every other split none.
    """
    from gmmseg_core.data import train_transforms

    kw = dict(cfg.dataset_kwargs)
    spec = kw.pop("transform", None)
    if spec is not None and not isinstance(spec, dict):
        raise ValueError(f"dataset_kwargs['transform'] must be a dict of train_transforms arguments (e.g. "
                         f"{{'crop_size': [512, 1024], 'scale': [2048, 1024]}}), got {spec!r}")
    if split == "train" and spec is not None:
        try:
            kw["transform"] = train_transforms(**spec)
        except TypeError as err:
            raise ValueError(f"dataset_kwargs['transform'] = {spec!r}: {err}") from err
    if split == "val":
        kw.update({k: v for k, v in cfg.val_dataset_kwargs.items() if k != "transform"})
    return kw


def adamw(params, lr: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, fused where this torch has a fused kernel for the parameters' devices.

    Fused: one kernel for all parameters instead of about ten ops per parameter (the cpu profile's models on the
    CPU: 3.4 -> 0.7 ms per step; fewer launches on a GPU). It rounds differently from the for-loop version
    (~1e-8). CUDA has the kernel since torch 2.0, the CPU since 2.4; elsewhere the default implementation runs.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    supported = _fused_adamw_devices(torch.__version__)
    fused = bool(tensors) and all(p.device.type in supported for p in tensors)
    return torch.optim.AdamW(params, lr=lr, fused=fused or None)


def _fused_adamw_devices(torch_version: str) -> set[str]:
    """Device types with a fused AdamW kernel in that torch: CUDA since 2.0, the CPU since 2.4.

    Compared by release numbers: a pre-release or source build of 2.4 (``2.4.0a0+git...``, ``2.4.0.dev20240601``,
    ``2.4.0rc1``) has 2.4's kernels but orders before ``"2.4"`` as a version.
    """
    return {"cuda"} | ({"cpu"} if Version(torch_version).release[:2] >= (2, 4) else set())


def train(cfg: TrainConfig, stop_after: int | None = None, on_step=None) -> Path:
    """Train a model; returns the run directory.

    Parameters
    ----------
    cfg : TrainConfig
    stop_after : int, optional
        Stop (as if interrupted) once this many steps are done, without marking the run finished; used to
        test resuming. Checkpoints already written stay.
    on_step : callable, optional
        ``on_step(step, model, outputs)`` after every step, on every process (``model`` is the bare
        SegmentationModel, ``outputs`` the dict of ``forward_train``); e.g. for live plots in a notebook.

    Returns
    -------
    Path of the run directory (``cfg.run_dir``).

    Raises
    ------
    FloatingPointError
        When the loss or the gradient norm is not finite (with fp16 autocast: ``NONFINITE_FP16_STEPS`` steps in a
        row), naming the step and the learning rate, before a checkpoint of that step is written. The run is
        not marked finished, so ``train_cached`` never serves it; its last checkpoint stays, and ``log.csv``
        ends with the failing step.
    DirectoryInUseError
        An ``OSError``, at once, when another process trains in ``cfg.run_dir``: names the directory and that
        process (pid, host); nothing in the directory changes. Under DDP, on every rank.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(cfg).__name__} {cfg!r}")
    _check_device(cfg.device)
    train_kwargs = dataset_kwargs_for(cfg, "train")     # a bad augmentation spec fails here, before any set-up
    # -- distributed set-up (every collective is a no-op in a single process) ---------------------------------
    # a process group made by the caller counts as much as torchrun's environment: the head gathers over it anyway
    group_ready = dist.is_available() and dist.is_initialized()
    ddp = group_ready or _launched_rank() is not None
    own_group = False
    if ddp:
        if group_ready:
            rank, world = dist.get_rank(), dist.get_world_size()
        else:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        use_cuda = (cfg.device or "cpu").startswith("cuda")
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device(cfg.device or "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device(cfg.device or "cpu")
        if device.type == "cuda" and device.index is not None:
            # what names no device (the loader's pin_memory, a bare "cuda" tensor) uses the current one: without
            # this, training on cuda:1 would also make a CUDA context, and hold memory, on cuda:0
            torch.cuda.set_device(device)
    host = None
    try:
        if ddp:
            # the groups are made inside the try, so that the clean-up below destroys them and a set-up failure (a
            # missing dataset, a refused resume, a locked run directory) leaves none behind
            if not group_ready:
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
                own_group = True
            host = _host_group()
        lock = _lock_run_dir(cfg.run_dir, rank == 0, host)
        try:
            if lock is not None:
                _remove_stale_temporaries(cfg.run_dir)
            return _train(cfg, stop_after, on_step, train_kwargs, rank, world, device, ddp, host)
        finally:
            if lock is not None:
                lock.release()
    finally:
        if own_group:
            dist.destroy_process_group()
        elif host is not None:
            dist.destroy_process_group(host)


_IN_USE_ADVICE = ("two trainings in one run directory would overwrite each other's checkpoint and log: wait for that "
                  "one to end (or stop it), or train this one elsewhere (another run_name or out_dir; through "
                  "train_cached, whose run directory the configuration names, another cache_dir)")


def _check_run_dir_free(run_dir) -> None:
    """Raise :class:`DirectoryInUseError` naming the process that trains in ``run_dir``, if one does (a check for
    a clear message before other checks of the directory; :func:`train` takes the lock itself). Under torchrun
    only rank 0 checks: the others would find its lock."""
    if not _launched_rank() and Path(run_dir).is_dir():
        DirectoryLock(run_dir).acquire(_IN_USE_ADVICE).release()


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what a write of the run's own files that was killed midway left in ``run_dir`` (the temporary files
    of :func:`~gmmseg_core._files.atomic_write`; ``checkpoint.pt.tmp`` can take hundreds of MB). Only for the
    holder of the run directory's lock: no other training writes these files meanwhile."""
    for name in RUN_FILES:
        temporary_path(run_dir / name).unlink(missing_ok=True)


def _lock_run_dir(run_dir: Path, master: bool, host) -> DirectoryLock | None:
    """Rank 0's lock on the run directory (only rank 0 writes there), None on the other ranks.

    Under DDP (``host``: the gloo group of :func:`_host_group`; None in a single process) every rank learns whether
    rank 0 got it, so that all of them stop, rather than the others waiting for ever in their first collective for a
    rank 0 that is gone.

    Raises
    ------
    DirectoryInUseError
        On every rank, when another process trains in ``run_dir``; names the directory and that process.
    OSError
        On every rank, when rank 0 cannot make ``run_dir`` or its lock file (a file in the way, no permission);
        rank 0's error, named, on the others.
    """
    lock, refusal = None, None
    if master:
        try:
            lock = DirectoryLock(run_dir).acquire(_IN_USE_ADVICE)
        except OSError as err:
            refusal = err
    if host is not None:
        message = [None if refusal is None else (str(refusal), getattr(refusal, "holder", None),
                                                 isinstance(refusal, DirectoryInUseError))]
        dist.broadcast_object_list(message, src=0, group=host)
        if message[0] is not None and refusal is None:
            text, holder, in_use = message[0]
            refusal = (DirectoryInUseError(text, run_dir, holder) if in_use else
                       OSError(f"rank 0 cannot lock the run directory {str(run_dir)!r}: {text}"))
    if refusal is not None:
        raise refusal
    return lock


def _train(cfg: TrainConfig, stop_after, on_step, train_kwargs: dict, rank: int, world: int, device: torch.device,
           ddp: bool, host) -> Path:
    """:func:`train` once the process groups are set up (``host``: the gloo group of :func:`_host_group`, None
    without DDP) and rank 0 holds the run directory's lock."""
    from gmmseg_core.data import build_dataset
    from gmmseg_core.evaluate import evaluate_closed_set

    master = rank == 0
    run_dir = cfg.run_dir
    ckpt_path = run_dir / CHECKPOINT
    ckpt = None
    if cfg.resume and ckpt_path.exists():
        # on the CPU: the RNG states must stay CPU tensors; load_state_dict moves the rest to the model's device
        ckpt = _load_checkpoint(ckpt_path, "cpu")
        _check_resumable(cfg, ckpt, run_dir)         # before anything in the run directory changes
    elif cfg.resume and master and (run_dir / "config.json").exists():   # a run was here and left nothing to resume
        warnings.warn(f"resume: the run in {str(run_dir)!r} left no checkpoint, so training starts again at step 0 "
                      f"(checkpoint_interval={cfg.checkpoint_interval}" + (": one is written only at the end)"
                                                                         if not cfg.checkpoint_interval else ")"),
                      stacklevel=3)   # the caller of train()

    # -- seeds, data, model (identical initialisation on every rank) ------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_ds = build_dataset(cfg.dataset, "train", root=cfg.data_root, **train_kwargs)
    val_ds = build_dataset(cfg.dataset, "val", root=cfg.data_root, **dataset_kwargs_for(cfg, "val"))
    spec = dict(arch=cfg.arch, head=cfg.head, num_classes=train_ds.num_classes, model_kwargs=cfg.model_kwargs,
                head_kwargs=cfg.head_kwargs)
    raw_model = build_model_from_spec(spec).to(device)

    # -- optimiser: AdamW, head x head_lr_mult, no weight decay on biases / norm weights -----------------------
    head_ids = {id(p) for p in raw_model.head.parameters()}
    groups = {}
    for p in raw_model.parameters():
        if not p.requires_grad:
            continue
        key = (id(p) in head_ids, p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    param_groups = [dict(params=ps, lr=cfg.lr * (cfg.head_lr_mult if is_head else 1.0),
                         weight_decay=cfg.weight_decay if decay else 0.0)
                    for (is_head, decay), ps in sorted(groups.items())]
    optimizer = adamw(param_groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    amp = cfg.amp if device.type == "cuda" else "none"
    if cfg.amp != "none" and amp == "none" and master:
        warnings.warn(f"amp={cfg.amp!r} needs CUDA; training in float32 on {device}", stacklevel=3)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    # -- resume ------------------------------------------------------------------------------------------------
    step = 0
    metrics = {"evals": [], "final": None, "finished": False, "classes": list(getattr(train_ds, "classes", []))}
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        # the saved param groups name the saving machine's implementation (fused=True from a GPU), for which this
        # torch may have no kernel on these parameters' device: the one adamw chose here stays
        implementation = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, chosen in zip(optimizer.param_groups, implementation):
            group.update(chosen)
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:      # empty when saved by a disabled scaler: a run resumed with fp16 starts it afresh
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        # the optimiser holds the rate the checkpointed schedule set for this step; a resume that changed ``iters``
        # must take its first step at the new schedule's rate too, not only the ones after
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(step, cfg)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        _set_rng_state(_saved_rng_state(ckpt, rank, world))
        metrics = ckpt["metrics"]
        if metrics.get("finished") and step >= cfg.iters:
            # the final checkpoint is written before metrics.json: finish an interrupted ending (as at the end of a
            # run, every process returns once the finished run is on disk)
            _on_rank_0(master, host, lambda: _write_json(run_dir / "metrics.json", metrics))
            return run_dir
        saved_world = int((ckpt.get("data") or {}).get("world_size", world))
        if saved_world != world and master:
            warnings.warn(f"resume: the checkpoint of {str(run_dir)!r} was written by {saved_world} process(es) and "
                          f"{world} resume it: the global batch changes from {saved_world * cfg.batch_size} to "
                          f"{world * cfg.batch_size} images, and every process restores the random states rank 0 saved",
                          stacklevel=3)   # the caller of train()
    continued = ckpt is not None and metrics.get("finished")   # continued to a larger ``iters``: not finished
    if continued:
        metrics.update(finished=False, final=None)

    def prepare_run_dir():
        if continued:
            _write_json(run_dir / "metrics.json", metrics)
        elif ckpt is None:  # a fresh start: nothing of an earlier run in this directory may be resumed or reported
            for name in (CHECKPOINT, "metrics.json"):
                (run_dir / name).unlink(missing_ok=True)
            for stale in run_dir.glob("eval_*.json"):      # gmmseg evaluate's results of the earlier model
                stale.unlink()
        # written once data and model are built: a configuration that fails to build leaves no run directory
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_json(run_dir / "config.json")
        _truncate_log(run_dir / "log.csv", step)

    _on_rank_0(master, host, prepare_run_dir)
    model = _TrainStep(raw_model)
    batches = _StepBatches(train_ds, cfg.batch_size, cfg.seed, step, cfg.iters, rank, world,
                           balanced=cfg.balanced_sampler)
    loader = DataLoader(_PositionedDataset(train_ds), batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=_collate_training_batch, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=False)

    def evaluate_now(at_step):
        def evaluate():
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                result = evaluate_closed_set(raw_model, val_ds, batch_size=cfg.batch_size, device=device,
                                             num_workers=0, progress=False)
            metrics["evals"].append({"step": at_step, **_eval_summary(result)})
            _write_json(run_dir / "metrics.json", metrics)

        _on_rank_0(master, host, evaluate)

    saved_step = step if ckpt is not None else None   # the checkpoint a failure leaves behind

    def save_checkpoint(at_step):
        nonlocal saved_step
        saved_step = at_step
        metrics["train_time_s"] = time.perf_counter() - t_start    # all segments of a resumed run
        rng = _rng_states(host, rank, world)

        def write():
            log_file.flush()      # the log rows up to the checkpoint survive a kill that skips all clean-up
            state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), step=at_step,
                         rng=rng[0], data=dict(step=at_step, epoch_length=batches.epoch_length,
                                               seed=cfg.seed, world_size=world),
                         config=cfg.to_dict(), model_spec=spec, metrics=metrics)
            if world > 1:
                state["rank_rng"] = rng
            atomic_write(ckpt_path, lambda p: torch.save(state, p))

        _on_rank_0(master, host, write)

    # -- the loop ----------------------------------------------------------------------------------------------
    raw_model.train()
    log_file = open(run_dir / "log.csv", "a", newline="") if master else None
    writer = None
    bar = progress_bar(total=cfg.iters, initial=step, desc="train", disable=not (master and cfg.progress),
                       dynamic_ncols=True)
    t_start = time.perf_counter() - float(metrics.get("train_time_s", 0.0))
    nonfinite = 0    # consecutive steps with a non-finite loss or gradient norm
    stop = _StopRequest(enabled=not ddp)
    try:
        if ddp:
            # No buffer broadcast before each forward: the GMM head gathers its update inputs across processes, so
            # its buffers (means, variances, the memory) stay identical everywhere without copying the memory every
            # step; BatchNorm running statistics stay per process (rank 0's are saved), as without SyncBatchNorm.
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, **_no_buffer_sync())
        stop.install()
        for images, labels in _batches(loader, stop):
            t0 = time.perf_counter()
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast:
                out = model(images, labels)
            loss = out["loss"]
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # no-op without fp16; makes the logged gradient norm the true one
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()

            # one host synchronisation per step, on every process, for everything logged and the divergence check
            # (the gradient norm is the same on every process under DDP, so the mean leaves it unchanged)
            logged = torch.stack([loss.detach().float(), torch.as_tensor(out.get("ce", loss)).detach().float(),
                                  torch.as_tensor(out.get("aux", 0.0), device=device).detach().float(),
                                  torch.as_tensor(grad_norm, device=device).detach().float()])
            # under DDP, log the means over processes. Each process's loss is the mean over its own labelled
            # pixels and DDP averages the gradients (as the released code): this equals the global batch's loss
            # when the processes hold equally many labelled pixels, and weights each process equally otherwise.
            if ddp:
                dist.all_reduce(logged)
                logged /= world
            loss_value, ce_value, aux_value, grad_norm_value = logged.tolist()
            # a non-finite gradient with a finite loss has already spoilt the weights (except under fp16, whose
            # GradScaler skips such a step): stop before a checkpoint of this step is written
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm_value)
            nonfinite = 0 if finite else nonfinite + 1
            # EM bookkeeping of the head (no gradients), for a step the optimiser took: non-finite embeddings pushed
            # into the memory would leave the mixtures NaN for good, whereas fp16's GradScaler skips such a step.
            # ``features`` is the tensor the head saw, so the head reuses its forward's embeddings and
            # feature-resolution logits (for "correctly classified"); passing the upsampled logits instead would
            # cost an argmax over the full-resolution map every step.
            if finite:
                with torch.no_grad():
                    raw_model.update_head(out["features"], labels)
            step += 1
            if on_step is not None:
                on_step(step, raw_model, out)
            if master:
                row = {"step": step, "loss": loss_value, "ce": ce_value, "aux": aux_value, "lr": lr,
                       "grad_norm": grad_norm_value,
                       "step_time_s": time.perf_counter() - t0}
                if writer is None:
                    writer = csv.DictWriter(log_file, fieldnames=list(row))
                    if log_file.tell() == 0:
                        writer.writeheader()
                writer.writerow(row)
                if step % cfg.log_interval == 0 or step == cfg.iters:
                    log_file.flush()
                    # shown by the bar's next redraw: a forced one every log_interval steps would flood a log file
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)
            # fp16: the GradScaler skips an update whose gradients overflow, so one bad step is not fatal
            if nonfinite >= (NONFINITE_FP16_STEPS if amp == "fp16" else 1):
                raise FloatingPointError(
                    f"training diverged: the loss is {loss_value} and the gradient norm {grad_norm_value} at step "
                    f"{step} (lr {lr:.3g}" + (f", {nonfinite} steps in a row" if nonfinite > 1 else "") + "). "
                    + ((f"The checkpoint of step {saved_step} is kept in {str(run_dir)!r}: resume=True continues "
                        "from it with grad_clip set" + (" or without fp16" if amp == "fp16" else "")
                        + "; a lower lr needs a new run (a checkpoint restores its own).")
                       if saved_step is not None else
                       "No checkpoint was written yet. " + ("Lower lr, set grad_clip, or train without fp16."
                                                            if amp == "fp16" else "Lower lr or set grad_clip.")))
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < cfg.iters:
                evaluate_now(step)
            if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step < cfg.iters:
                save_checkpoint(step)
            if stop_after is not None and step >= stop_after and step < cfg.iters:
                return run_dir
            if stop.signal is not None and step < cfg.iters:
                break
        if stop.signal is not None and step < cfg.iters:      # Ctrl-C or SIGTERM: keep every completed step
            if saved_step != step:
                save_checkpoint(step)
            raise stop.stop(step, run_dir)

        # -- the end: final evaluation, checkpoint, metrics -------------------------------------------------------
        evaluate_now(step)
        metrics["final"] = metrics["evals"][-1] if master else None
        metrics["finished"] = True
        metrics["train_time_s"] = time.perf_counter() - t_start
        save_checkpoint(step)
        # every process returns a finished run: what it reads next of the run directory is complete
        _on_rank_0(master, host, lambda: _write_json(run_dir / "metrics.json", metrics))
        if stop.signal is not None:      # asked to stop during the last step or the final evaluation: finished
            raise stop.stop(step, run_dir, finished=True)
        return run_dir
    finally:
        stop.restore()
        bar.close()
        if log_file is not None:
            log_file.close()


# Fields a resumed run may change: what it does next (iters, clipping, precision), how it reports, and where things
# are. Everything else is either restored from the checkpoint (the optimiser's and scheduler's hyper-parameters)
# or defines the model, the data stream or the schedule the checkpoint belongs to.
RESUME_MAY_CHANGE = ("iters", "grad_clip", "amp", "eval_interval", "log_interval", "checkpoint_interval", "device",
                     "num_workers", "data_root", "out_dir", "run_name", "resume", "progress")


def _check_resumable(cfg: TrainConfig, ckpt: dict, run_dir: Path) -> None:
    """Refuse to resume a checkpoint written under another configuration, or one already past ``cfg.iters``."""
    saved, now = without_data_cache_dirs(ckpt.get("config") or {}), without_data_cache_dirs(cfg.to_dict())
    differ = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if differ:
        raise ValueError(f"cannot resume the run in {str(run_dir)!r}: its checkpoint was trained with "
                         + ", ".join(f"{k}={saved[k]!r}" for k in differ) + ", this configuration has "
                         + ", ".join(f"{k}={now[k]!r}" for k in differ) + f" (a resumed run may change only "
                         f"{', '.join(RESUME_MAY_CHANGE)}). Start a new run (another run_name or out_dir), or "
                         "drop resume to start this one afresh.")
    if int(ckpt["step"]) > cfg.iters:
        raise ValueError(f"cannot resume the run in {str(run_dir)!r}: its checkpoint is at step {int(ckpt['step'])}, "
                         f"past iters={cfg.iters}; give iters >= {int(ckpt['step'])}")


def _load_checkpoint(path: Path, map_location) -> dict:
    """``torch.load`` of a checkpoint, with an error that names the file when it cannot be read (callers check
    the device first: ``map_location`` must be usable here)."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as err:
        raise ValueError(f"cannot read the checkpoint {str(path)!r} ({type(err).__name__}: {err}); it is damaged "
                         "or not a gmmseg checkpoint") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise ValueError(f"{str(path)!r} is not a gmmseg checkpoint (no model state and step)")
    return ckpt


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the log rows of steps <= ``step`` (a resumed run rewrites what followed its checkpoint)."""
    if step == 0 or not path.exists():
        if path.exists():
            path.unlink()
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return

    def write(tmp: Path) -> None:       # into a new file: a failed or killed rewrite keeps every row of the old one
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            # complete rows only: a kill can leave a torn last row behind (the file is flushed every few steps)
            writer.writerows(r for r in rows if all(r.values()) and r["step"].isdigit() and int(r["step"]) <= step)

    atomic_write(path, write)


# ------------------------------------------------------------------------------------------------ runs
def _check_device(name) -> None:
    """Fail before any data is generated when ``TrainConfig.device`` cannot be used on this machine."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {name!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but this torch ({torch.__version__}) sees no CUDA device; "
                             "use device='cpu' or None")
        under_torchrun = _launched_rank() is not None   # each process then takes cuda:LOCAL_RANK
        if device.index is not None and not under_torchrun and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def load_run(run_dir, device=None):
    """Load a trained run.

    Parameters
    ----------
    run_dir : str or Path
        A directory written by :func:`train`.
    device : torch.device or str, optional (default cpu)

    Returns
    -------
    (model in eval mode, TrainConfig, metrics dict from ``metrics.json`` (or the checkpoint's))
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no {CHECKPOINT} in run directory {str(run_dir)!r}; train it first")
    _check_device(None if device is None else str(device))
    device = torch.device(device) if device is not None else torch.device("cpu")
    ckpt = _load_checkpoint(path, device)
    model = build_model_from_spec(ckpt["model_spec"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    cfg = TrainConfig.from_dict(ckpt["config"])
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else _jsonable(ckpt["metrics"])
    return model, cfg, metrics


def is_finished(run_dir) -> bool:
    """True when ``run_dir`` holds a completed run (metrics.json says finished and the checkpoint exists)."""
    run_dir = Path(run_dir)
    try:
        done = json.loads((run_dir / "metrics.json").read_text()).get("finished", False)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(done) and (run_dir / CHECKPOINT).exists()


def _cached_run_config(cfg: TrainConfig, cache_dir) -> TrainConfig:
    """``cfg`` relocated to its cache entry: ``cache_dir / cfg.default_run_name()``, resumed if unfinished."""
    return cfg.replace(out_dir=str(cache_dir), run_name=cfg.default_run_name(), resume=True)


CACHE_WAIT_POLL_S = 2.0   # how often train_cached looks again while another process trains the same run


def train_cached(cfg: TrainConfig, cache_dir="runs/cache", wait: bool = True) -> Path:
    """Train ``cfg`` unless an identical finished run is in ``cache_dir``; returns its run directory.

    The run directory is ``cache_dir / cfg.default_run_name()`` (it ends with ``cfg.cache_key()``), so every
    config differing only in run-location fields (``out_dir``, ``run_name``, ``resume``, workers, logging) maps
    to the same directory. An unfinished run there is resumed from its last checkpoint.

    When another process is training that run (a second notebook, a ``gmmseg reproduce`` beside this one: it holds
    the run directory's lock), ``wait=True`` says so once on stderr, waits for that process to end, then returns
    the run if it finished or resumes it if not; ``wait=False`` raises :class:`DirectoryInUseError` at once, as
    :func:`train` does. Under DDP, and when the lock's holder is this very process, it never waits.
    """
    run_cfg = _cached_run_config(cfg, cache_dir)
    distributed = _launched_rank() is not None or (dist.is_available() and dist.is_initialized())
    told = False
    while True:
        if is_finished(run_cfg.run_dir):
            return run_cfg.run_dir
        try:
            return train(run_cfg)
        except DirectoryInUseError as err:     # raised before train() reads or writes anything in the directory
            holder = err.holder or {}
            if not wait or distributed or (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
                raise
            if not told:
                who = f"process {holder['pid']}" if "pid" in holder else "another process"
                print(f"train_cached: {who} is training this configuration in {str(run_cfg.run_dir)!r}; waiting "
                      "for it to end", file=sys.stderr, flush=True)
                told = True
            time.sleep(CACHE_WAIT_POLL_S)


def _train_cached_in_worker(cfg_dict: dict, cache_dir: str, threads: int) -> str:
    """Body of a :func:`train_cached_many` worker process (a fresh interpreter)."""
    torch.set_num_threads(threads)
    return str(train_cached(TrainConfig.from_dict(cfg_dict).replace(progress=False), cache_dir))


def train_cached_many(cfgs, cache_dir="runs/cache", processes: int = 1, progress: bool = True) -> list[Path]:
    """:func:`train_cached` for several configurations, up to ``processes`` trainings at a time.

    The configurations not yet finished in ``cache_dir`` train in worker processes (fresh interpreters,
    ``spawn``), each with this process's torch thread count and progress bars off. Every training seeds itself
    at its start, so its result does not depend on what runs beside it: the models are the same as
    ``[train_cached(c, cache_dir) for c in cfgs]`` would make. Worth it where one training leaves cores idle,
    e.g. the cpu profile's single-threaded trainings on a 2-core machine; on one GPU keep ``processes=1``
    unless you have measured otherwise.

    Parameters
    ----------
    cfgs : sequence of TrainConfig
        Configurations mapping to the same run directory train once.
    cache_dir : path
    processes : int
        Trainings at a time; 1 trains in this process, one after the other.
    progress : bool
        A bar over the trainings (the trainings' own bars are off when ``processes > 1``).

    Returns
    -------
    list of Path
        Run directories, in the order of ``cfgs``.

    Raises
    ------
    RuntimeError
        With ``processes > 1``, when a training failed: names its run, after the others have finished (their
        results are kept). One at a time, the first failure propagates as it is and stops the rest.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    processes = check_int("processes", processes)
    cfgs = list(cfgs)
    for i, cfg in enumerate(cfgs):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfgs[{i}] must be a TrainConfig, got {type(cfg).__name__}")
    run_dirs = [_cached_run_config(cfg, cache_dir).run_dir for cfg in cfgs]
    todo = {}
    for cfg, run_dir in zip(cfgs, run_dirs):
        if not is_finished(run_dir):
            todo.setdefault(run_dir, cfg)
    if processes == 1 or len(todo) <= 1:
        for cfg in progress_bar(todo.values(), desc="train", disable=not progress or len(todo) <= 1):
            train_cached(cfg, cache_dir)
        return run_dirs
    failures = []
    pool = ProcessPoolExecutor(max_workers=min(processes, len(todo)), mp_context=multiprocessing.get_context("spawn"))
    bar = progress_bar(total=len(todo), desc=f"train ({processes} processes)", disable=not progress)
    try:
        futures = {pool.submit(_train_cached_in_worker, cfg.to_dict(), str(cache_dir), torch.get_num_threads()):
                   run_dir.name for run_dir, cfg in todo.items()}
        for future in as_completed(futures):
            err = future.exception()
            if err is not None:
                failures.append((futures[future], err))
            bar.update(1)
    except BaseException:
        # an interrupt stops the running trainings at once; their last checkpoints resume them next time
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown()
    if failures:
        name, err = failures[0]
        raise RuntimeError(f"training {name!r} failed ({len(failures)} of {len(todo)} failed): "
                           f"{type(err).__name__}: {err}") from err
    return run_dirs
