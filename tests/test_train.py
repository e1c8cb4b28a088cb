"""Training loop, run directory, resume, caching and TrainConfig."""

import csv
import json
import multiprocessing
import re
import time

import numpy as np
import pytest
import torch

from gmmseg_core._files import DirectoryInUseError, DirectoryLock
from gmmseg_core.config import TrainConfig, parse_overrides
from gmmseg_core.train import (
    _StepBatches,
    is_finished,
    load_run,
    lr_factor,
    train,
    train_cached,
    train_cached_many,
)


def tiny_cfg(tmp_path, **kw):
    base = dict(arch="fcn", head="gmm", iters=4, batch_size=2, model_kwargs=dict(width=4),
                head_kwargs=dict(embed_dim=4, num_components=2), dataset_kwargs=dict(image_size=32, num_images=6),
                val_dataset_kwargs=dict(num_images=2), out_dir=str(tmp_path), progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- config


def test_config_json_round_trip_and_overrides(tmp_path):
    cfg = tiny_cfg(tmp_path, grad_clip=1.0, amp="bf16")
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    new = cfg.with_overrides(["iters=7", "lr=3e-4", "head_kwargs.variant=official", "data_root=null"])
    assert new.iters == 7 and new.lr == 3e-4 and new.head_kwargs["variant"] == "official"
    assert new.head_kwargs["embed_dim"] == 4
    assert parse_overrides(["arch=segformer", "resume=true"]) == {"arch": "segformer", "resume": True}


@pytest.mark.parametrize("field, value, message", [
    ("head", "svm", "head must be one of"),
    ("iters", 0, "iters must be a positive int, got 0"),
    ("lr", -1.0, "lr must be a positive finite number, got -1.0"),
    ("lr", float("inf"), "lr must be a positive finite number, got inf"),
    ("seed", -1, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    ("seed", 2**32, r"seed must be an int in \[0, 2\*\*32\), got 4294967296"),
    ("model_kwargs", {"width": 4, "bogus": 1}, r"model_kwargs \['bogus'\] are not arguments of FCNBackbone"),
    ("head_kwargs", {"embed_dim": 4, "num_comps": 2}, r"head_kwargs \['num_comps'\] are not arguments of GMMHead"),
    ("amp", "fp8", "amp must be one of"),
    ("grad_clip", 0, "grad_clip must be None or a positive number"),
    ("dataset_kwargs", {"image_size": 32, "foo": 1},
     r"dataset_kwargs \['foo'\] are not arguments of dataset 'scenes'; it takes \['image_size', 'num_images', "),
    ("val_dataset_kwargs", {"num_images": 2, "bar": 1, "baz": 2},
     r"val_dataset_kwargs \['bar', 'baz'\] are not arguments of dataset 'scenes'; it takes \['image_size'"),
])
def test_config_validation_names_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(tmp_path, **{field: value})


@pytest.mark.parametrize("dataset", ["scenes", "fashion", "digits", "cityscapes", "ade20k"])
def test_experiment_configs_pass_the_dataset_option_check(tmp_path, dataset):
    from gmmseg_core.profiles import TRAIN, experiment_config

    for profile in TRAIN:
        cfg = experiment_config(TRAIN[profile], "fcn", "gmm_official", dataset, 0, cache_dir=str(tmp_path))
        assert set(cfg.dataset_kwargs) >= {"image_size", "num_images"}


def test_config_checks_dataset_options_against_the_chosen_dataset(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ValueError, match=r"dataset_kwargs \['foo'\] are not arguments of dataset 'scenes'"):
        cfg.with_overrides(["dataset_kwargs.foo=1"])
    digits = cfg.replace(dataset="digits", dataset_kwargs=dict(image_size=32, objects=[1, 2], held_out=["9"]))
    assert digits.dataset_kwargs["objects"] == [1, 2]
    with pytest.raises(ValueError, match=r"dataset_kwargs \['cache_dir'\] are not arguments of dataset "
                                         r"'cityscapes'; it takes \['image_size', 'num_images', 'transform'\]"):
        cfg.replace(dataset="cityscapes", dataset_kwargs=dict(image_size=32, cache_dir="data"))


def test_config_rejects_gmm_arguments_for_the_softmax_head(tmp_path):
    with pytest.raises(ValueError, match=r"head_kwargs \['variant'\] are not arguments of SoftmaxHead; it takes "
                                         r"\['dropout'\]"):
        tiny_cfg(tmp_path, head="softmax", head_kwargs={"variant": "official"})


def test_config_checks_the_architecture_name(tmp_path):
    with pytest.raises(ValueError, match=r"arch must be one of \['deeplabv3plus', 'fcn', 'segformer'\]"):
        tiny_cfg(tmp_path, arch="unet")
    with pytest.raises(ValueError, match="an smp arch must look like 'smp:<Architecture>:<encoder>'"):
        tiny_cfg(tmp_path, arch="smp:Segformer")
    assert tiny_cfg(tmp_path, arch="smp:Segformer:mit_b0").arch == "smp:Segformer:mit_b0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unusable_device_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"device='cuda:0', but this torch .* sees no CUDA device"):
        train(tiny_cfg(tmp_path, device="cuda:0"))
    with pytest.raises(ValueError, match="device must be a torch device string such as 'cpu' or 'cuda:0', got 'gpu'"):
        train(tiny_cfg(tmp_path, device="gpu"))
    assert not any(tmp_path.iterdir())


TORCHRUN_RANK_1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("device, env, selected", [("cuda:1", {}, [1]), ("cuda", {}, []), ("cpu", {}, []),
                                                   ("cuda", TORCHRUN_RANK_1, [1]), ("cpu", TORCHRUN_RANK_1, [])])
def test_training_on_a_numbered_gpu_makes_it_the_current_device(tmp_path, monkeypatch, device, env, selected):
    # stand-in for a two-GPU machine: the loader's pin_memory works on the current device, cuda:0 unless set;
    # under torchrun each process takes cuda:LOCAL_RANK
    from gmmseg_core import data

    class Stop(Exception):
        pass

    def build_dataset(*args, **kwargs):     # the first thing after the device is chosen (one process)
        raise Stop

    def init_process_group(*args, **kwargs):  # the first thing after the device is chosen (under torchrun)
        raise Stop

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d).index))
    monkeypatch.setattr(data, "build_dataset", build_dataset)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Stop):
        train(tiny_cfg(tmp_path, device=device))
    assert calls == selected


def test_config_unknown_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['itres'\]"):
        TrainConfig.from_dict({"itres": 3})
    with pytest.raises(ValueError, match="unknown TrainConfig field 'foo'"):
        TrainConfig().with_overrides(["foo=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["iters"])


def test_cache_key_ignores_run_location_only(tmp_path):
    cfg = tiny_cfg(tmp_path)
    same = cfg.replace(out_dir="elsewhere", run_name="x", resume=True, num_workers=2, log_interval=3,
                       checkpoint_interval=2, device="cpu")
    assert cfg.cache_key() == same.cache_key()
    assert len(cfg.cache_key()) == 16
    assert cfg.cache_key() != cfg.replace(seed=1).cache_key()
    assert cfg.cache_key() != cfg.replace(head_kwargs=dict(embed_dim=4, num_components=3)).cache_key()
    assert cfg.cache_key() != cfg.replace(device="cuda:0").cache_key()
    moved = cfg.replace(dataset_kwargs={**cfg.dataset_kwargs, "cache_dir": "/somewhere/data"})
    assert moved.cache_key() == cfg.cache_key()


def test_cache_key_ignores_settings_that_cannot_change_the_model(tmp_path):
    cfg = tiny_cfg(tmp_path)                               # scenes: generated, whatever the data root
    assert cfg.replace(data_root="/data").cache_key() == cfg.cache_key()
    assert cfg.replace(amp="bf16").cache_key() == cfg.cache_key()           # float32 on a CPU anyway
    on_gpu = cfg.replace(device="cuda")
    assert on_gpu.replace(amp="bf16").cache_key() != on_gpu.cache_key()


def _fashion_look_alike(folder, top, gzipped=True):
    """The four Fashion-MNIST IDX files (20 images each) in ``folder``; ``top`` shapes the sprites."""
    import gzip

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((20, 28, 28), np.uint8)
    images[:, top:22, 8:20] = 200
    for part in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", np.arange(20) % 10)):
            data = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            name = folder / (f"{part}-{kind}-ubyte" + (".gz" if gzipped else ""))
            with (gzip.open if gzipped else open)(name, "wb") as f:
                f.write(data + array.astype(np.uint8).tobytes())


def _fashion_with_a_system_copy(tmp_path, monkeypatch):
    """A fashion TrainConfig on a machine whose system Fashion-MNIST copy is a look-alike under tmp_path/system
    (no $GMMSEG_DATA)."""
    from gmmseg_core.data import composites

    monkeypatch.delenv("GMMSEG_DATA", raising=False)
    monkeypatch.setattr(composites, "FASHION_DIRS", [str(tmp_path / "system")])
    _fashion_look_alike(tmp_path / "system", top=6)
    return tiny_cfg(tmp_path, dataset="fashion")


def test_a_fashion_run_is_keyed_by_the_sprites_it_reads_not_by_its_data_root(tmp_path, monkeypatch):
    fashion = _fashion_with_a_system_copy(tmp_path, monkeypatch)
    key = fashion.cache_key()
    (tmp_path / "cityscapes").mkdir()                    # a root with other data sets only: the system copy
    assert fashion.replace(data_root=str(tmp_path / "cityscapes")).cache_key() == key
    assert fashion.replace(data_root=str(tmp_path / "system")).cache_key() == key
    _fashion_look_alike(tmp_path / "copy" / "fashion-mnist", top=6, gzipped=False)   # the same content
    assert fashion.replace(data_root=str(tmp_path / "copy")).cache_key() == key
    _fashion_look_alike(tmp_path / "other", top=10)                                  # other sprites
    _fashion_look_alike(tmp_path / "other-again", top=10)
    other = fashion.replace(data_root=str(tmp_path / "other")).cache_key()
    assert other != key and fashion.replace(data_root=str(tmp_path / "other-again")).cache_key() == other


def test_a_fashion_run_without_a_data_root_is_keyed_by_what_gmmseg_data_makes_it_read(tmp_path, monkeypatch):
    from gmmseg_core.data import composites

    fashion = _fashion_with_a_system_copy(tmp_path, monkeypatch)
    default = fashion.cache_key()
    assert composites.fashion_root_key(None) is None          # the default run's key holds no data root
    (tmp_path / "cityscapes").mkdir()
    for same in ("cityscapes", "system"):       # no Fashion-MNIST there (the system copy is read), or the system copy
        monkeypatch.setenv("GMMSEG_DATA", str(tmp_path / same))
        assert fashion.cache_key() == default
    _fashion_look_alike(tmp_path / "a" / "fashion-mnist", top=10)
    _fashion_look_alike(tmp_path / "b", top=14)
    keys = []
    for other in ("a", "b"):                    # other sprites read from $GMMSEG_DATA: other models
        monkeypatch.setenv("GMMSEG_DATA", str(tmp_path / other))
        keys.append(fashion.cache_key())
        monkeypatch.delenv("GMMSEG_DATA")
        assert fashion.replace(data_root=str(tmp_path / other)).cache_key() == keys[-1]   # as that root would
    assert len({default, *keys}) == 3


def test_a_real_data_run_is_keyed_by_the_folder_it_reads(tmp_path, monkeypatch):
    cityscapes = tiny_cfg(tmp_path, dataset="cityscapes")
    keys = []
    for folder in ("a", "b"):                   # no data root: $GMMSEG_DATA says where the files are
        monkeypatch.setenv("GMMSEG_DATA", str(tmp_path / folder))
        keys.append(cityscapes.cache_key())
    monkeypatch.delenv("GMMSEG_DATA")
    assert keys[0] != keys[1]
    assert cityscapes.replace(data_root=str(tmp_path / "b")).cache_key() == keys[1]
    monkeypatch.chdir(tmp_path)                 # a relative root counts as the folder it names
    assert cityscapes.replace(data_root="a").cache_key() == keys[0]


def test_lr_schedule_warmup_then_poly():
    cfg = TrainConfig(iters=10, warmup_iters=4, poly_power=1.0)
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[0] == pytest.approx(0.25 * 1.0) and factors[3] == pytest.approx(1.0 * 0.7)
    assert all(a > b for a, b in zip(factors[3:], factors[4:]))
    assert lr_factor(5, TrainConfig(iters=10, poly_power=0.0)) == 1.0


def test_step_batches_shard_a_global_batch_like_one_process():
    ds = list(range(5))
    one = _StepBatches(ds, 4, seed=3, start_step=0, num_steps=4)
    ranks = [_StepBatches(ds, 2, seed=3, start_step=0, num_steps=4, rank=r, world=2) for r in range(2)]
    for step in range(4):
        assert one.batch(step) == ranks[0].batch(step) + ranks[1].batch(step)
    # every epoch is a permutation; resuming at step 2 yields the same batches
    first = [i for s in range(5) for i, _ in one.batch(s)][:5]
    assert sorted(first) == ds
    assert list(_StepBatches(ds, 4, 3, start_step=2, num_steps=4)) == [one.batch(2), one.batch(3)]


# ---------------------------------------------------------------------------------------------- training


def test_train_writes_a_complete_run_directory(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=3, eval_interval=2, head_lr_mult=10.0)
    run_dir = train(cfg)
    assert run_dir == cfg.run_dir and is_finished(run_dir)
    assert TrainConfig.from_json(run_dir / "config.json") == cfg
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss"]) > 0 for r in rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [2, 3]
    assert metrics["final"]["step"] == 3 and 0 <= metrics["final"]["miou"] <= 1
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    lrs = sorted({g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]})
    assert lrs == pytest.approx([cfg.lr, cfg.lr * 10.0])
    model, cfg2, metrics2 = load_run(run_dir)
    assert cfg2 == cfg and metrics2["final"] == metrics["final"]
    assert not model.training and model.is_generative
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 8, 32, 32) and torch.isfinite(model.class_log_likelihood(x)).all()


# the second stream: two DataLoader workers, class-balanced epochs and random augmentations, so the resumed run
# must continue the sampler's epochs and every item's augmentation draw, whichever worker loads it
RESUMED_STREAMS = {
    "plain": {},
    "workers-balanced-augmented": dict(num_workers=2, balanced_sampler=True, dataset_kwargs=dict(
        image_size=32, num_images=6, transform={"crop_size": 24})),
}


@pytest.mark.parametrize("stream", RESUMED_STREAMS.values(), ids=RESUMED_STREAMS.keys())
def test_resume_continues_bit_for_bit(tmp_path, stream):
    cfg = tiny_cfg(tmp_path, iters=6, checkpoint_interval=3, eval_interval=2, warmup_iters=2, **stream)
    full = train(cfg.replace(run_name="full"))
    part_cfg = cfg.replace(run_name="part")
    train(part_cfg, stop_after=4)  # interrupted after step 4; last checkpoint at step 3
    assert not is_finished(part_cfg.run_dir)
    part = train(part_cfg.replace(resume=True))
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # parameters and every GMM buffer (means, variances, memory, pointers)
        assert torch.equal(a["model"][key], b["model"][key]), key
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])

    def losses(run_dir):
        with open(run_dir / "log.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]
    assert losses(full) == losses(part)
    assert json.loads((full / "metrics.json").read_text())["final"] == \
        json.loads((part / "metrics.json").read_text())["final"]


def test_the_worker_count_does_not_change_the_trained_model(tmp_path):
    """The cache key leaves num_workers out: augmentations and class-balanced draws must not depend on it."""
    stream = RESUMED_STREAMS["workers-balanced-augmented"]
    runs = [train(tiny_cfg(tmp_path, iters=4, run_name=f"w{w}", **{**stream, "num_workers": w})) for w in (0, 2)]
    logs = []
    for run_dir in runs:
        with open(run_dir / "log.csv") as f:
            logs.append([(r["loss"], r["grad_norm"]) for r in csv.DictReader(f)])
    assert logs[0] == logs[1]
    a, b = (torch.load(r / "checkpoint.pt", weights_only=False)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cached_reuses_a_finished_run(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={})
    first = train_cached(cfg, tmp_path / "cache")
    stamp = (first / "checkpoint.pt").stat().st_mtime_ns
    again = train_cached(cfg.replace(out_dir="ignored", run_name="other"), tmp_path / "cache")
    assert again == first and (first / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert first.name.endswith(cfg.cache_key()[:8])


def test_train_cached_many_in_processes_equals_one_after_the_other(tmp_path):
    cfgs = [tiny_cfg(tmp_path, iters=3, seed=s, head_kwargs=dict(embed_dim=4, num_components=2, variant=v))
            for s, v in ((0, "paper"), (1, "official"))]
    cfgs.append(cfgs[0].replace(run_name="same-config-elsewhere"))
    parallel = train_cached_many(cfgs, tmp_path / "parallel", processes=2, progress=False)
    serial = [train_cached(c, tmp_path / "serial") for c in cfgs[:2]]
    assert parallel[0] == parallel[2] and [p.name for p in parallel[:2]] == [p.name for p in serial]
    for a, b in zip(parallel, serial):
        ma, mb = load_run(a)[0].state_dict(), load_run(b)[0].state_dict()
        assert all(torch.equal(ma[k], mb[k]) for k in mb), a.name
    stamp = (parallel[0] / "checkpoint.pt").stat().st_mtime_ns
    assert train_cached_many(cfgs, tmp_path / "parallel", processes=2) == parallel      # all cached now
    assert (parallel[0] / "checkpoint.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="processes must be a positive int, got 0"):
        train_cached_many(cfgs, tmp_path, processes=0)


def test_train_cached_many_takes_a_numpy_integer_count_of_processes(tmp_path):
    assert train_cached_many([], tmp_path, processes=np.int64(2)) == []
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match=f"^processes must be a positive int, got {bad!r}$"):
            train_cached_many([], tmp_path, processes=bad)


def test_train_cached_many_names_a_failed_run_and_keeps_the_others(tmp_path):
    good = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={})
    bad = good.replace(seed=5, dataset_kwargs=dict(image_size=32, num_images=6, void_width=-1))
    with pytest.raises(RuntimeError, match=r"training 'fcn_softmax_scenes_s5_\w+' failed \(1 of 2 failed\): "
                                           r"ValueError"):
        train_cached_many([good, bad], tmp_path / "cache", processes=2, progress=False)
    assert is_finished(tmp_path / "cache" / good.default_run_name())


def test_train_cached_many_stops_its_workers_on_an_interrupt(tmp_path, monkeypatch):
    import concurrent.futures

    def interrupted(futures):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(concurrent.futures, "as_completed", interrupted)
    cfgs = [tiny_cfg(tmp_path, iters=400, seed=s, head="softmax", head_kwargs={}) for s in (0, 1)]
    with pytest.raises(KeyboardInterrupt):
        train_cached_many(cfgs, tmp_path / "cache", processes=2, progress=False)
    for _ in range(600):   # until the workers are gone: at once when stopped, after their trainings otherwise
        if not multiprocessing.active_children():
            break
        time.sleep(0.1)
    assert not any(is_finished(tmp_path / "cache" / c.default_run_name()) for c in cfgs)


def test_balanced_sampler_option(tmp_path):
    sampler = pytest.importorskip("gmmseg_core.data.sampler")
    from gmmseg_core.data import build_dataset

    ds = build_dataset("scenes", "train", image_size=32, num_images=6)
    stream = _StepBatches(ds, 2, seed=0, start_step=0, num_steps=3, balanced=True)
    ref = sampler.ClassBalancedSampler(ds, seed=0)
    ref.set_epoch(0)
    assert [i for s in range(3) for i, _ in stream.batch(s)] == list(ref)
    run_dir = train(tiny_cfg(tmp_path, iters=2, balanced_sampler=True))
    assert is_finished(run_dir)


def test_balanced_stream_is_sharded_once_under_a_process_group(monkeypatch):
    """Ranks of a 2-process group together draw what one process with the global batch draws."""
    from gmmseg_core.data import build_dataset

    ds = build_dataset("scenes", "train", image_size=16, num_images=8)
    one = _StepBatches(ds, 4, seed=0, start_step=0, num_steps=5, balanced=True)
    single = [one.batch(s) for s in range(5)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    streams = []
    for rank in range(2):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, _r=rank, **k: _r)
        streams.append(_StepBatches(ds, 2, seed=0, start_step=0, num_steps=5, rank=rank, world=2, balanced=True))
    assert [streams[0].batch(s) + streams[1].batch(s) for s in range(5)] == single


def test_resuming_a_checkpoint_of_another_process_count_warns_at_the_caller_of_train(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=2, checkpoint_interval=1, head="softmax", head_kwargs={})
    train(cfg, stop_after=1)
    ckpt = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)
    ckpt["data"]["world_size"] = 2                      # as two processes would have written it
    torch.save(ckpt, cfg.run_dir / "checkpoint.pt")
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\) and 1 resume it") as caught:
        train(cfg.replace(resume=True))
    assert caught[0].filename == __file__


def test_amp_on_cpu_warns_and_trains_in_float32(tmp_path):
    with pytest.warns(UserWarning, match="amp='bf16' needs CUDA") as caught:
        run_dir = train(tiny_cfg(tmp_path, iters=1, amp="bf16", head="softmax", head_kwargs={}))
    assert caught[0].filename == __file__                 # the warning points at the caller of train()
    model, _, _ = load_run(run_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fresh_start_discards_an_earlier_run_in_the_same_directory(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={}, run_name="same")
    train(cfg)
    train(cfg.replace(iters=1))  # resume=False: starts over, the old log and checkpoint do not leak in
    with open(cfg.run_dir / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1]
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["step"] == 1


def test_adamw_is_fused_on_cpu_and_keeps_param_groups():
    from packaging.version import Version

    from gmmseg_core.train import adamw

    a, b = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))
    opt = adamw([dict(params=[a], lr=0.1, weight_decay=0.01), dict(params=[b], lr=0.2, weight_decay=0.0)], lr=0.1)
    cpu_kernel = Version(torch.__version__).release >= (2, 4)  # torch 2.3 has the fused kernel for CUDA only
    assert opt.defaults["fused"] is (True if cpu_kernel else None)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    ref = torch.optim.AdamW([dict(params=[a.detach().clone().requires_grad_()], lr=0.1, weight_decay=0.01),
                             dict(params=[b.detach().clone().requires_grad_()], lr=0.2, weight_decay=0.0)], lr=0.1)
    for o in (opt, ref):
        for p in (p for g in o.param_groups for p in g["params"]):
            p.grad = torch.ones_like(p)
        o.step()
    for g, h in zip(opt.param_groups, ref.param_groups):
        torch.testing.assert_close(g["params"][0], h["params"][0])      # same update up to rounding


@pytest.mark.parametrize("version, cpu_kernel", [
    ("2.3.1", False), ("2.3.1+cpu", False), ("2.4.0", True), ("2.4", True), ("2.4.0a0", True),
    ("2.4.0a0+git1a2b3c4", True), ("2.4.0.dev20240601", True), ("2.4.0rc1", True), ("2.14.1+cu130", True),
])
def test_adamw_fuses_on_the_cpu_from_torch_2_4_pre_releases_included(monkeypatch, version, cpu_kernel):
    from gmmseg_core.train import adamw

    monkeypatch.setattr(torch, "__version__", version)
    opt = adamw([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    assert opt.defaults["fused"] is (True if cpu_kernel else None)


def test_a_non_finite_step_does_not_reach_the_mixtures(tmp_path, monkeypatch):
    from gmmseg_core import train as train_module

    real_forward = train_module._TrainStep.forward
    calls = {"n": 0}

    def forward(self, images, labels):      # step 3's features (and so loss and embeddings) turn NaN
        calls["n"] += 1
        if calls["n"] == 3:
            images = images * float("nan")
        return real_forward(self, images, labels)

    seen = {}

    def on_step(step, model, out):
        seen[step] = (int(model.head.num_updates), bool(torch.isfinite(model.head.means).all()),
                      bool(torch.isfinite(model.head.memory).all()))

    monkeypatch.setattr(train_module._TrainStep, "forward", forward)
    cfg = tiny_cfg(tmp_path, iters=6, head_kwargs=dict(embed_dim=4, num_components=2, update_interval=1))
    with pytest.raises(FloatingPointError, match="at step 3"):
        train(cfg, on_step=on_step)
    assert seen[2] == (2, True, True) and seen[3] == (2, True, True)     # step 3 left the head untouched


def test_a_resume_that_changes_iters_steps_at_the_new_schedules_rate(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=4, head="softmax", head_kwargs={}, lr=1e-3, run_name="grow")
    train(cfg)
    longer = cfg.replace(iters=8, resume=True)
    assert train(longer) == cfg.run_dir
    with open(longer.run_dir / "log.csv") as f:
        lrs = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert lrs[4] == pytest.approx(1e-3 * lr_factor(3, cfg))                 # the first run's schedule
    for step in range(5, 9):
        assert lrs[step] == pytest.approx(1e-3 * lr_factor(step - 1, longer)), step


def test_a_torn_log_row_is_dropped_on_resume_and_time_spans_segments(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=6, checkpoint_interval=3, head="softmax", head_kwargs={}, run_name="torn")
    train(cfg, stop_after=4, on_step=lambda *a: time.sleep(0.2))
    log = cfg.run_dir / "log.csv"
    log.write_text(log.read_text() + "1")          # a kill left only the first byte of the next row
    train(cfg.replace(resume=True), on_step=lambda *a: time.sleep(0.2))
    with open(log) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    # steps 1-3 before the checkpoint and 4-6 after it are all counted (0.2 s each at least)
    assert json.loads((cfg.run_dir / "metrics.json").read_text())["train_time_s"] >= 6 * 0.2


def test_a_diverging_run_stops_at_once_and_keeps_its_last_checkpoint(tmp_path, monkeypatch):
    from gmmseg_core import train as train_module

    real_forward = train_module._TrainStep.forward
    calls = {"n": 0}

    def forward(self, images, labels):      # the loss turns NaN at step 4
        out = real_forward(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_module._TrainStep, "forward", forward)
    cfg = tiny_cfg(tmp_path, iters=8, checkpoint_interval=3)
    with pytest.raises(FloatingPointError, match=r"the loss is nan and the gradient norm nan at step 4 \(lr .*"
                                                 r"checkpoint of step 3 is kept"):
        train(cfg)
    assert calls["n"] == 4                                   # nothing trained after the failing step
    assert not is_finished(cfg.run_dir)                      # so train_cached would not serve it
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
    with open(cfg.run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == "nan"


class _NaNGradient(torch.autograd.Function):
    """0, with a NaN gradient for its input."""

    @staticmethod
    def forward(ctx, p):
        ctx.shape = p.shape
        return p.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"))


def test_a_nan_gradient_with_a_finite_loss_stops_before_its_checkpoint(tmp_path, monkeypatch):
    from gmmseg_core import train as train_module

    real_forward = train_module._TrainStep.forward
    calls = {"n": 0}

    def forward(self, images, labels):      # finite loss, NaN gradient at step 3
        out = real_forward(self, images, labels)
        calls["n"] += 1
        if calls["n"] == 3:
            weight = next(self.parameters())
            out["loss"] = out["loss"] + _NaNGradient.apply(weight)
        return out

    monkeypatch.setattr(train_module._TrainStep, "forward", forward)
    cfg = tiny_cfg(tmp_path, iters=8, checkpoint_interval=3, head="softmax", head_kwargs={})
    with pytest.raises(FloatingPointError, match=r"gradient norm nan at step 3 .*No checkpoint was written yet\. "
                                                 r"Lower lr or set grad_clip\.$"):
        train(cfg)
    assert calls["n"] == 3 and not (cfg.run_dir / "checkpoint.pt").exists()


_KILLED_RUN = """
import os, sys
import torch
from gmmseg_core.config import TrainConfig
from gmmseg_core.train import train
torch.set_num_threads(int(sys.argv[2]))      # as the test process: the same rounding
cfg = TrainConfig.from_json(sys.argv[1])
train(cfg, on_step=lambda step, model, out: os._exit(3) if step == 7 else None)
"""


def test_a_killed_run_keeps_the_log_of_its_checkpoint_and_resumes_it(tmp_path):
    import subprocess
    import sys

    cfg = tiny_cfg(tmp_path, iters=9, checkpoint_interval=5, log_interval=100, head="softmax", head_kwargs={})
    full = train(cfg.replace(run_name="full"))
    killed = cfg.replace(run_name="killed")
    config = tmp_path / "killed.json"
    killed.to_json(config)
    # killed without any clean-up (as by SIGKILL) two steps after its checkpoint of step 5
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(config), str(torch.get_num_threads())],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr

    def losses(run_dir):
        with open(run_dir / "log.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]
    assert [s for s, _ in losses(killed.run_dir)][:5] == ["1", "2", "3", "4", "5"]
    train(killed.replace(resume=True))
    assert losses(killed.run_dir) == losses(full)


def test_resume_finishes_a_run_interrupted_after_its_final_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=3, head="softmax", head_kwargs={})
    run_dir = train(cfg)
    done = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**done, "finished": False, "final": None}))
    assert not is_finished(run_dir)             # as if killed between the final checkpoint and metrics.json
    train(cfg.replace(resume=True))
    assert is_finished(run_dir) and json.loads((run_dir / "metrics.json").read_text())["final"] == done["final"]


def test_a_finished_run_continued_to_more_iters_is_not_finished_until_it_ends(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=3, head="softmax", head_kwargs={}, run_name="grow")
    train(cfg)
    longer = cfg.replace(iters=5, resume=True)
    train(longer, stop_after=4)
    metrics = json.loads((longer.run_dir / "metrics.json").read_text())
    assert not is_finished(longer.run_dir) and metrics["final"] is None
    train(longer)
    assert is_finished(longer.run_dir)


# ---------------------------------------------------------------------------------------------- resume checks


def test_resume_refuses_a_checkpoint_of_another_configuration_and_leaves_the_run_alone(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=2, head="softmax", head_kwargs={}, run_name="r")
    train(cfg, stop_after=3)
    before = {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()}
    with pytest.raises(ValueError, match=r"cannot resume the run in .*trained with arch='fcn', model_kwargs=\{'width': 4\}, "
                                         r"batch_size=2, this configuration has arch='segformer', model_kwargs=\{\}, "
                                         r"batch_size=1 \(a resumed run may change only iters, .*Start a new run"):
        train(cfg.replace(arch="segformer", model_kwargs={}, batch_size=1, resume=True))
    assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before
    with pytest.raises(ValueError, match=r"checkpoint is at step 2, past iters=1; give iters >= 2"):
        train(cfg.replace(iters=1, resume=True))
    train(cfg.replace(resume=True, eval_interval=1, log_interval=5))      # what it may change, it may
    assert is_finished(cfg.run_dir)


def test_resume_without_a_checkpoint_says_it_starts_afresh(tmp_path):
    import warnings

    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={}, resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # nothing was here: resume simply starts (as train_cached does)
        train(cfg, stop_after=1)                 # ... and stops with no checkpoint written
    with pytest.warns(UserWarning, match=r"resume: the run in .* left no checkpoint, so training starts again at "
                                         r"step 0 \(checkpoint_interval=0: one is written only at the end\)"):
        train(cfg)


def test_a_configuration_that_fails_to_build_leaves_no_run_directory(tmp_path):
    cfg = tiny_cfg(tmp_path, dataset_kwargs=dict(image_size=32, num_images=6, transform="mmseg"))
    with pytest.raises(ValueError, match=r"dataset_kwargs\['transform'\] must be a dict of train_transforms"):
        train(cfg)
    with pytest.raises(TypeError, match=r"train needs a TrainConfig, got str 'fcn'"):
        train("fcn")
    assert not cfg.run_dir.exists()


def test_a_damaged_checkpoint_is_named(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={})
    run_dir = train(cfg)
    (run_dir / "checkpoint.pt").write_bytes(b"garbage\n")
    with pytest.raises(ValueError, match=r"cannot read the checkpoint '.*checkpoint.pt' .*damaged or not a gmmseg"):
        load_run(run_dir)
    with pytest.raises(ValueError, match=r"cannot read the checkpoint"):
        train(cfg.replace(resume=True))


def test_augmentation_spec_applies_to_the_training_split_only(tmp_path):
    from gmmseg_core.data.transforms import Compose
    from gmmseg_core.train import dataset_kwargs_for

    spec = {"crop_size": [24, 24], "photometric": False}
    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={},
                   dataset_kwargs=dict(image_size=32, num_images=6, transform=spec))
    assert isinstance(dataset_kwargs_for(cfg, "train")["transform"], Compose)
    assert "transform" not in dataset_kwargs_for(cfg, "val") and "transform" not in dataset_kwargs_for(cfg, "x")
    assert dataset_kwargs_for(cfg, "val")["num_images"] == 2
    seen = []
    train(cfg, on_step=lambda step, model, out: seen.append(tuple(out["logits"].shape[-2:])))
    assert seen == [(24, 24), (24, 24)]          # the crops, not the 32 x 32 images
    with pytest.raises(ValueError, match=r"dataset_kwargs\['transform'\] = \{'crop': 3\}: .*'crop'"):
        train(cfg.replace(dataset_kwargs=dict(image_size=32, transform={"crop": 3})))


# ---------------------------------------------------------------------------------------------- interrupts


@pytest.fixture
def default_signal_handlers():
    """SIGINT and SIGTERM as in an interactive process (a background job, as CI may run, ignores SIGINT)."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signal_at(step_wanted, sig, times=1):
    import signal

    def on_step(step, model, out):
        if step == step_wanted:
            for _ in range(times):
                signal.raise_signal(sig)
    return on_step


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path, default_signal_handlers):
    import signal

    cfg = tiny_cfg(tmp_path, iters=6, head_kwargs=dict(embed_dim=4, num_components=2, variant="official"))
    full = train(cfg.replace(run_name="full"))
    part = cfg.replace(run_name="part")
    with pytest.raises(KeyboardInterrupt, match=r"training stopped after step 3; its checkpoint is in .*--resume"):
        train(part, on_step=_signal_at(3, signal.SIGINT))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler        # handlers restored
    assert torch.load(part.run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
    train(part.replace(resume=True))
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part.run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_with_a_checkpoint_and_a_second_signal_at_once(tmp_path, default_signal_handlers):
    import signal

    cfg = tiny_cfg(tmp_path, iters=4, head="softmax", head_kwargs={})
    with pytest.raises(SystemExit) as stopped:
        train(cfg, on_step=_signal_at(2, signal.SIGTERM))
    assert stopped.value.code == 143
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    with pytest.raises(KeyboardInterrupt) as at_once:
        train(cfg.replace(run_name="twice"), on_step=_signal_at(2, signal.SIGINT, times=2))
    assert "stopped after" not in str(at_once.value)
    assert not (cfg.replace(run_name="twice").run_dir / "checkpoint.pt").exists()


def test_an_ignored_sigint_stays_ignored(tmp_path):
    import signal

    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cfg = tiny_cfg(tmp_path, iters=3, head="softmax", head_kwargs={})
        assert is_finished(train(cfg, on_step=_signal_at(1, signal.SIGINT)))      # no stop, no error
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved)


def test_a_run_of_a_dataset_registered_elsewhere_still_loads_its_config(tmp_path):
    # a dataset registered by the user in the training process is unknown to a fresh one that loads the run
    cfg = tiny_cfg(tmp_path / "runs", dataset="my_scenes", dataset_kwargs={"anything": 1}, run_name="r")
    assert TrainConfig.from_json(cfg.to_json()).dataset == "my_scenes"
    with pytest.raises(ValueError, match="unknown dataset 'my_scenes'"):
        train(cfg)
    assert not cfg.run_dir.exists()


def test_a_stop_during_the_last_step_takes_effect_once_the_run_is_complete(tmp_path, default_signal_handlers):
    import signal

    cfg = tiny_cfg(tmp_path, iters=3, head="softmax", head_kwargs={})
    with pytest.raises(KeyboardInterrupt, match=r"training finished \(step 3\) before the stop took effect"):
        train(cfg, on_step=_signal_at(3, signal.SIGINT))
    assert is_finished(cfg.run_dir)
    with pytest.raises(SystemExit):
        train(cfg.replace(run_name="term"), on_step=_signal_at(3, signal.SIGTERM))
    assert is_finished(cfg.replace(run_name="term").run_dir)


def test_resume_ignores_where_generated_data_is_cached(tmp_path, monkeypatch):
    # reproduce writes absolute cache paths, a notebook opened by hand relative ones: the same cache entry
    monkeypatch.chdir(tmp_path)                        # the relative cache lands in the test's folder
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=2, head="softmax", head_kwargs={},
                   dataset_kwargs=dict(image_size=32, num_images=6, cache_dir=str(tmp_path / "data")))
    train_cached(cfg, tmp_path / "cache")
    entry = train_cached(cfg, tmp_path / "cache")
    (entry / "metrics.json").unlink()                  # as if stopped before the end
    ckpt = torch.load(entry / "checkpoint.pt", weights_only=False)
    ckpt["metrics"] = {**ckpt["metrics"], "finished": False}
    ckpt["step"] = 2
    torch.save(ckpt, entry / "checkpoint.pt")
    moved = cfg.replace(dataset_kwargs=dict(image_size=32, num_images=6, cache_dir="relative/data"))
    assert moved.cache_key() == cfg.cache_key()
    assert train_cached(moved, tmp_path / "cache") == entry and is_finished(entry)


def test_resume_may_switch_on_fp16_from_a_float32_checkpoint(tmp_path):
    from gmmseg_core import train as train_module

    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=2, head="softmax", head_kwargs={})
    train(cfg, stop_after=2)
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["scaler"] == {}
    seen = {}
    real = torch.amp.GradScaler

    class Recording(real):                       # a CPU stand-in for the CUDA scaler of an fp16 run
        def __init__(self, device, enabled=True):
            super().__init__("cpu", enabled=True)

        def load_state_dict(self, state):
            seen["loaded"] = state
            super().load_state_dict(state)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(train_module.torch.amp, "GradScaler", Recording)
    try:
        train(cfg.replace(resume=True))
    finally:
        monkeypatch.undo()
    assert "loaded" not in seen and is_finished(cfg.run_dir)


def test_a_device_that_is_not_here_is_named_not_called_a_damaged_checkpoint(tmp_path):
    run_dir = train(tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={}))
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA device"):
        load_run(run_dir, device="cuda")



def test_resume_uses_the_optimiser_implementation_of_this_machine_not_the_checkpoints(tmp_path, monkeypatch):
    # a checkpoint of a fused AdamW (a GPU, or a CPU under torch >= 2.4) resumed where torch has no fused kernel
    # for the parameters' device (a CPU under torch 2.3): the saved param_groups carry fused=True
    cfg = tiny_cfg(tmp_path, iters=3, checkpoint_interval=2, head="softmax", head_kwargs={})
    train(cfg, stop_after=2)
    path = cfg.run_dir / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:  # already so where this torch fuses on the CPU
        group["fused"] = True
    torch.save(ckpt, path)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torch, "__version__", "2.3.0")
    monkeypatch.setattr(torch, "_fused_adamw_", no_kernel)
    train(cfg.replace(resume=True))
    assert is_finished(cfg.run_dir)


def test_resume_on_a_machine_with_fewer_gpus_restores_the_rng_states_of_those_it_has(monkeypatch):
    # a checkpoint written where two GPUs were visible, resumed where one is: torch.cuda.default_generators has
    # one entry, so setting a second device's state fails with an IndexError
    import random

    import numpy as np

    from gmmseg_core.train import _set_rng_state

    restored = {}

    def set_rng_state(new_state, device="cuda"):
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        if index >= 1:
            raise IndexError("tuple index out of range")
        restored[index] = new_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)   # what set_rng_state_all calls
    cuda = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    _set_rng_state({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": cuda})
    assert list(restored) == [0] and torch.equal(restored[0], cuda[0])


# ---------------------------------------------------------------------------------------------- optimiser and loop


def test_param_groups_give_the_head_its_lr_and_spare_biases_and_norms_weight_decay(tmp_path, monkeypatch):
    from gmmseg_core import train as train_module

    groups, names = [], {}
    real_adamw = train_module.adamw

    def recording(params, lr):
        params = list(params)
        groups.extend(params)
        return real_adamw(params, lr)

    monkeypatch.setattr(train_module, "adamw", recording)
    cfg = tiny_cfg(tmp_path, iters=1, lr=1e-3, head_lr_mult=7.0, weight_decay=0.05)
    train(cfg, on_step=lambda step, model, out: names.update({id(p): n for n, p in model.named_parameters()}))
    seen = set()
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["initial_lr"] == pytest.approx(1e-3 * (7.0 if name.startswith("head.") else 1.0)), name
            assert group["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0), name
    assert seen == set(names.values())
    assert any(n.startswith("head.") for n in seen) and any(p.ndim < 2 for g in groups for p in g["params"])


def _parameter_steps(tmp_path, **kw):
    """The largest change of any parameter in step 2 of a two-step softmax run."""
    snapshots = []
    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={}, weight_decay=0.0, **kw)
    train(cfg, on_step=lambda step, model, out: snapshots.append(
        torch.cat([p.detach().flatten().clone() for p in model.parameters()])))
    return (snapshots[1] - snapshots[0]).abs().max().item()


def test_grad_clip_bounds_the_gradient_the_optimiser_sees(tmp_path):
    # AdamW's step is about lr whatever the gradient's scale, until the gradient is small next to its eps (1e-8):
    # clipped to a norm of 1e-12 the parameters barely move
    free = _parameter_steps(tmp_path / "free", lr=1e-3)
    clipped = _parameter_steps(tmp_path / "clipped", lr=1e-3, grad_clip=1e-12)
    assert free > 1e-4 and clipped < 1e-3 * free


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):          # the disk fills up halfway through the second checkpoint
        saves["n"] += 1
        if saves["n"] == 2:
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=1, head="softmax", head_kwargs={})
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_run(cfg.run_dir)[0] is not None
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["step"] == 1


def test_a_full_disk_under_torch_save_names_the_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = torch.save
    saves = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):    # torch.save reports a full disk as a RuntimeError, half-way through
        saves["n"] += 1
        if saves["n"] == 2:
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 497280 vs 497168")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=1, head="softmax", head_kwargs={})
    with pytest.raises(OSError, match=r"cannot write '.*checkpoint\.pt' \(is the disk full\?\).*left as it was"):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["checkpoint.pt", "config.json", "log.csv"]
    assert torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["step"] == 1


def test_a_failed_log_rewrite_on_resume_keeps_every_row(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, iters=6, checkpoint_interval=2, head="softmax", head_kwargs={})
    train(cfg, stop_after=3)
    log = cfg.run_dir / "log.csv"
    before = log.read_text()
    assert before.count("\n") == 4            # the header and steps 1-3

    def full_disk(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg.replace(resume=True))       # the resume drops step 3 from the log, on a full disk
    assert log.read_text() == before
    monkeypatch.undo()
    train(cfg.replace(resume=True))
    with open(log) as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4", "5", "6"]


def test_a_failed_config_write_on_resume_keeps_the_runs_config_json(tmp_path, monkeypatch):
    from pathlib import Path

    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={}, run_name="r")
    train(cfg)
    config = cfg.run_dir / "config.json"
    before = config.read_text()
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):    # opened (so emptied) for writing, then the disk is full
        if self.name.startswith("config.json"):
            real_write_text(self, "")
            raise OSError(28, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train(cfg.replace(resume=True, iters=3))
    monkeypatch.undo()
    assert config.read_text() == before      # gmmseg train --config <run>/config.json --resume still works
    assert TrainConfig.from_json(config) == cfg


def test_resume_restores_the_random_state_of_a_model_that_draws_random_numbers(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=2, head="softmax", head_kwargs={"dropout": 0.5})
    full = train(cfg.replace(run_name="full"))
    part = cfg.replace(run_name="part")
    train(part, stop_after=2)
    train(part.replace(resume=True))
    a = torch.load(full / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(part.run_dir / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_ending_on_an_eval_interval_evaluates_its_last_step_once(tmp_path):
    run_dir = train(tiny_cfg(tmp_path, iters=4, eval_interval=2, head="softmax", head_kwargs={}))
    assert [e["step"] for e in json.loads((run_dir / "metrics.json").read_text())["evals"]] == [2, 4]


def test_step_batches_give_every_position_its_own_augmentation_seed_and_every_epoch_its_own_order():
    ds = list(range(6))
    stream = _StepBatches(ds, 3, seed=1, start_step=0, num_steps=20)
    batches = [stream.batch(s) for s in range(20)]              # 10 epochs of 6 images
    seeds = [seed for batch in batches for _, seed in batch]
    assert len(set(seeds)) == len(seeds)
    epochs = [tuple(i for batch in batches[2 * e:2 * e + 2] for i, _ in batch) for e in range(10)]
    assert all(sorted(e) == ds for e in epochs) and len(set(epochs)) > 5


def test_an_items_augmentation_depends_on_its_stream_position_only():
    from gmmseg_core.data import build_dataset, train_transforms
    from gmmseg_core.train import _PositionedDataset

    ds = _PositionedDataset(build_dataset("scenes", "train", image_size=32, num_images=2,
                                          transform=train_transforms(24, photometric=False)))
    torch.manual_seed(1)
    first = ds[(0, 12345)]
    torch.manual_seed(2)              # another global state, as in a DataLoader worker or a resumed run
    again = ds[(0, 12345)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not all(torch.equal(first[0], ds[(0, seed)][0]) for seed in range(1, 5))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    ds[(0, 12345)]
    assert torch.equal(torch.get_rng_state(), state)          # the training stream's RNG is left alone


def test_a_run_without_its_checkpoint_is_not_finished_and_trains_again(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={})
    run_dir = train_cached(cfg, tmp_path / "cache")
    (run_dir / "checkpoint.pt").unlink()
    assert not is_finished(run_dir)
    with pytest.warns(UserWarning, match="left no checkpoint, so training starts again at step 0"):
        assert train_cached(cfg, tmp_path / "cache") == run_dir
    assert (run_dir / "checkpoint.pt").exists() and is_finished(run_dir)


def test_train_cached_resumes_an_unfinished_run_from_its_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=4, checkpoint_interval=2, head="softmax", head_kwargs={})
    entry = tmp_path / "cache" / cfg.default_run_name()
    train(cfg.replace(out_dir=str(tmp_path / "cache"), run_name=entry.name, resume=True), stop_after=3)
    with open(entry / "log.csv") as f:
        before = list(csv.DictReader(f))[:2]             # the steps up to its checkpoint
    assert train_cached(cfg, tmp_path / "cache") == entry and is_finished(entry)
    with open(entry / "log.csv") as f:
        after = list(csv.DictReader(f))
    assert after[:2] == before and [int(r["step"]) for r in after] == [1, 2, 3, 4]


def test_validation_overrides_apply_to_the_validation_split_only(tmp_path):
    from gmmseg_core.train import dataset_kwargs_for

    cfg = tiny_cfg(tmp_path)              # 6 training images, 2 validation images
    assert dataset_kwargs_for(cfg, "val")["num_images"] == 2
    for split in ("train", "statistics", "anomaly"):
        assert dataset_kwargs_for(cfg, split)["num_images"] == 6, split


def test_run_files_are_strict_json_with_null_for_nan(tmp_path):
    import numpy as np

    from gmmseg_core.train import _write_json

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    _write_json(tmp_path / "m.json", {"iou": [0.5, float("nan"), np.float32("nan")], "ece": np.float64("nan")})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"iou": [0.5, None, None],
                                                                                   "ece": None}


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be a positive int, got 0"),
    ("head_lr_mult", 0, "head_lr_mult must be a positive number, got 0"),
    ("weight_decay", -0.1, "weight_decay must be a number >= 0, got -0.1"),
    ("warmup_iters", -1, "warmup_iters must be an int >= 0, got -1"),
    ("warmup_iters", 2.5, "warmup_iters must be an int >= 0, got 2.5"),
    ("poly_power", -1.0, "poly_power must be a number >= 0, got -1.0"),
    ("eval_interval", -1, "eval_interval must be an int >= 0, got -1"),
    ("checkpoint_interval", 1.5, "checkpoint_interval must be an int >= 0, got 1.5"),
    ("num_workers", -2, "num_workers must be an int >= 0, got -2"),
    ("log_interval", 0, "log_interval must be a positive int, got 0"),
    ("iters", True, "iters must be a positive int, got True"),
    ("data_root", 3, "data_root must be None or a path string, got 3"),
    ("device", 0, "device must be None or a string such as 'cuda:0', got 0"),
    ("resume", "yes", "resume must be a bool, got 'yes'"),
    ("balanced_sampler", 1, "balanced_sampler must be a bool, got 1"),
    ("out_dir", "", "out_dir must be a non-empty path string, got ''"),
    ("run_name", "a/b", "run_name must be None or a name without '/', got 'a/b'"),
])
def test_config_validation_covers_every_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_cfg(tmp_path, **{field: value})


@pytest.mark.parametrize("field, value", [("iters", np.int64(5)), ("lr", np.float32(0.1)), ("resume", np.bool_(True))])
def test_config_asks_for_a_python_number_in_place_of_a_numpy_scalar(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {re.escape(repr(value))} \(a numpy scalar: "
                                         r"give a Python one, the config is stored as JSON\)$"):
        tiny_cfg(tmp_path, **{field: value})


def test_a_dotted_override_of_a_field_that_is_not_a_dict_is_named(tmp_path):
    with pytest.raises(ValueError, match="override 'iters.x': field 'iters' is not a dict"):
        tiny_cfg(tmp_path).with_overrides(["iters.x=1"])


def test_cache_key_ignores_the_progress_bar_and_the_device_index_but_not_the_release(tmp_path, monkeypatch):
    from gmmseg_core import config

    cfg = tiny_cfg(tmp_path, device="cuda:0")
    key = cfg.cache_key()
    assert cfg.replace(progress=not cfg.progress).cache_key() == key
    assert cfg.replace(device="cuda:1").cache_key() == cfg.replace(device="cuda").cache_key() == key
    monkeypatch.setattr(config, "__version__", "0.0.0-other")     # a cache written by another release
    assert cfg.cache_key() != key


def test_default_run_name_names_the_model_the_data_and_the_seed(tmp_path):
    cfg = tiny_cfg(tmp_path, seed=3)
    assert cfg.default_run_name() == f"fcn_gmm-paper_scenes_s3_{cfg.cache_key()[:8]}"
    official = cfg.replace(head_kwargs={**cfg.head_kwargs, "variant": "official"})
    assert official.default_run_name().startswith("fcn_gmm-official_scenes_s3_")


def test_resume_refuses_to_change_the_schedule_or_the_optimiser(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=3, checkpoint_interval=1, head="softmax", head_kwargs={}, run_name="r")
    train(cfg, stop_after=1)
    for field, value in (("lr", 5e-4), ("head_lr_mult", 2.0), ("weight_decay", 0.0), ("warmup_iters", 2),
                         ("poly_power", 0.9), ("seed", 1), ("balanced_sampler", True)):
        with pytest.raises(ValueError, match=rf"cannot resume .*trained with {field}="):
            train(cfg.replace(resume=True, **{field: value}))


def test_every_evaluation_records_the_closed_set_summary(tmp_path):
    run_dir = train(tiny_cfg(tmp_path, iters=2, eval_interval=1, head="softmax", head_kwargs={}))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = {"step", "miou", "per_class_iou", "pixel_acc", "mean_acc", "ece", "num_images"}
    assert [set(e) for e in metrics["evals"]] == [summary, summary] and metrics["final"] == metrics["evals"][-1]
    assert len(metrics["final"]["per_class_iou"]) == 8 and metrics["final"]["num_images"] == 2


def _ade20k_of_two_sizes(root):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, tag in (("training", "train"), ("validation", "val")):
        for j, (h, w) in enumerate([(24, 32), (32, 24)]):
            stem = f"ADE_{tag}_{j + 1:08d}"
            for folder, arr in (("images", rng.integers(0, 256, (h, w, 3))), ("annotations", rng.integers(0, 151, (h, w)))):
                path = root / "ADEChallengeData2016" / folder / sub / f"{stem}.{'jpg' if folder == 'images' else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(path)
    return root


def test_training_images_of_different_sizes_are_refused_with_the_remedy(tmp_path):
    root = str(_ade20k_of_two_sizes(tmp_path / "data"))
    cfg = tiny_cfg(tmp_path, dataset="ade20k", data_root=root, iters=1, dataset_kwargs={})
    with pytest.raises(ValueError, match=r"mixes image sizes \[\(24, 32\), \(32, 24\)\].*image_size.*crop_size"):
        train(cfg)


# ---------------------------------------------------------------------------------------------- progress


def _redraws(monkeypatch, stream, steps=300):
    """Redraws of a progress bar over ``steps`` items written to ``stream``, on a clock that ticks 1 s a read."""
    import itertools
    import sys

    import tqdm.std

    from gmmseg_core._files import progress_bar

    clock = itertools.count(0.0, 1.0)
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    for _ in progress_bar(range(steps), desc="train"):
        pass
    return stream.getvalue().count("\r")


def test_a_progress_bar_written_to_a_log_file_redraws_every_half_minute(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    # ~300 s of work: a log file (a CI job) gets a line every 30 s, a terminal tqdm's own 10 a second
    assert _redraws(monkeypatch, io.StringIO()) <= 300 / 30 + 2
    assert _redraws(monkeypatch, Terminal()) > 100


def test_a_training_logged_to_a_file_does_not_redraw_its_bar_every_log_interval(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)      # as outside a notebook
    train(tiny_cfg(tmp_path, iters=8, log_interval=1, progress=True, head="softmax", head_kwargs={}))
    bar = capsys.readouterr().err
    assert "8/8" in bar and "loss=" in bar               # the final line says where the run ended
    assert bar.count("\r") <= 3                           # opened, closed (and maybe once between)


# ---------------------------------------------------------------------------------------------- run directory lock
_LOCK_HOLDER = """
import os, sys, time
from gmmseg_core._files import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
child = os.fork() if sys.argv[2] == "fork" else None     # as a DataLoader worker: outlives a killed parent a while
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child or 0, flush=True)
time.sleep(60)
"""


def _hold_lock(folder, fork=False):
    """A process holding ``folder``'s lock (and, with ``fork``, a forked child of it); returns (process, child pid)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder), "fork" if fork else "-"],
                              stdout=subprocess.PIPE, text=True)
    return holder, int(holder.stdout.readline())


def test_a_second_training_in_a_run_directory_fails_at_once_and_a_killed_ones_lock_dies_with_it(tmp_path):
    import socket

    cfg = tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={})
    holder, _ = _hold_lock(cfg.run_dir)
    try:
        message = (rf"the directory '{re.escape(str(cfg.run_dir))}' is in use by process {holder.pid} on host "
                   rf"'{re.escape(socket.gethostname())}' \(since .*Z\).*overwrite each other's checkpoint and log")
        for attempt in (lambda: train(cfg), lambda: train(cfg.replace(resume=True)),
                        lambda: train_cached(cfg, tmp_path, wait=False)):  # the same directory: cfg's cache entry
            with pytest.raises(DirectoryInUseError, match=message):
                attempt()
        assert [p.name for p in cfg.run_dir.iterdir()] == ["train.lock"]    # nothing written or removed
    finally:
        holder.kill()                                  # SIGKILL: no clean-up, the lock file stays
        holder.wait()
        holder.stdout.close()
    assert (cfg.run_dir / "train.lock").exists()
    assert is_finished(train(cfg))
    assert not (cfg.run_dir / "train.lock").exists()


def test_a_cached_training_in_use_is_told_to_use_another_cache_dir(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={})
    with DirectoryLock(tmp_path / "cache" / cfg.default_run_name()):    # as a notebook training it elsewhere
        with pytest.raises(DirectoryInUseError, match=r"through train_cached, .* another cache_dir\)$"):
            train_cached(cfg, tmp_path / "cache")


_BRIEF_HOLDER = """
import sys, time
from gmmseg_core._files import DirectoryLock
lock = DirectoryLock(sys.argv[1]).acquire()
print(flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def test_a_cached_training_waits_for_another_process_training_it_then_trains(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys

    from gmmseg_core import train as train_module

    monkeypatch.setattr(train_module, "CACHE_WAIT_POLL_S", 0.05)
    cfg = tiny_cfg(tmp_path, iters=1, head="softmax", head_kwargs={})
    run_dir = tmp_path / "cache" / cfg.default_run_name()
    holder = subprocess.Popen([sys.executable, "-c", _BRIEF_HOLDER, str(run_dir), "1.0"], stdout=subprocess.PIPE,
                              text=True)
    try:
        holder.stdout.readline()                       # it holds the lock now
        start = time.perf_counter()
        assert train_cached(cfg, tmp_path / "cache") == run_dir and is_finished(run_dir)
        assert holder.poll() is not None or time.perf_counter() - start >= 0.5   # it waited for the holder
        err = capsys.readouterr().err
        assert err.count(f"train_cached: process {holder.pid} is training this configuration in") == 1
    finally:
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == 0


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    import os
    import signal

    holder, child = _hold_lock(tmp_path / "run", fork=True)
    try:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        DirectoryLock(tmp_path / "run").acquire().release()        # while the child still runs
        assert os.path.exists(f"/proc/{child}") or not os.path.exists("/proc/self")
    finally:
        os.kill(child, signal.SIGKILL)


_TRY_LOCK = """
import sys
from gmmseg_core._files import DirectoryInUseError, DirectoryLock
try:
    DirectoryLock(sys.argv[1]).acquire()
except DirectoryInUseError as err:
    print(err)
"""


def test_a_training_holds_its_run_directory_from_start_to_end(tmp_path):
    import os
    import subprocess
    import sys

    cfg = tiny_cfg(tmp_path, iters=2, head="softmax", head_kwargs={})
    seen = []

    def try_again(step, model, out):
        if step == 1:
            seen.append(subprocess.run([sys.executable, "-c", _TRY_LOCK, str(cfg.run_dir)], capture_output=True,
                                       text=True, check=True).stdout)
            with pytest.raises(DirectoryInUseError, match=f"in use by process {os.getpid()} "):
                train(cfg.replace(resume=True))              # in this same process too

    train(cfg, on_step=try_again)
    assert re.match(rf"the directory '{re.escape(str(cfg.run_dir))}' is in use by process {os.getpid()} ", seen[0])
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["checkpoint.pt", "config.json", "log.csv",
                                                             "metrics.json"]
    train(cfg.replace(resume=True, iters=3))            # released: the run continues


def test_a_training_that_fails_to_build_releases_its_run_directory(tmp_path):
    cfg = tiny_cfg(tmp_path / "runs", dataset="cityscapes", data_root=str(tmp_path / "nowhere"),
                   dataset_kwargs={}, val_dataset_kwargs={})
    with pytest.raises(FileNotFoundError, match="nowhere"):             # while building the data
        train(cfg)
    assert not (tmp_path / "runs").exists()             # the directories it made for its lock are gone again
    with DirectoryLock(cfg.run_dir):                     # and nothing holds it
        pass



def test_a_forked_child_that_releases_the_lock_leaves_its_parents_lock_alone(tmp_path):
    import os

    lock = DirectoryLock(tmp_path / "run").acquire()
    try:
        child = os.fork()
        if child == 0:                      # a copy of this process, unwinding what it inherited
            try:
                lock.release()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        assert (tmp_path / "run" / "train.lock").exists()
        with pytest.raises(DirectoryInUseError):
            DirectoryLock(tmp_path / "run").acquire()
    finally:
        lock.release()


def test_a_lock_taken_on_a_full_disk_holds_without_its_record(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        lock = DirectoryLock(tmp_path / "run").acquire()
    try:
        assert lock.locked
        with pytest.raises(DirectoryInUseError, match=r"is in use by another process, which holds its lock file"):
            DirectoryLock(tmp_path / "run").acquire()
    finally:
        lock.release()
    assert not (tmp_path / "run").exists()


def test_the_command_lines_check_for_a_running_training_is_left_to_rank_0_under_torchrun(tmp_path, monkeypatch):
    from gmmseg_core.train import _check_run_dir_free

    with DirectoryLock(tmp_path):                        # rank 0, already training
        monkeypatch.setenv("RANK", "1")
        _check_run_dir_free(tmp_path)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(DirectoryInUseError):
            _check_run_dir_free(tmp_path)


def test_a_training_deletes_the_temporary_files_a_killed_write_left_only_while_it_holds_the_run_directory(tmp_path):
    cfg = tiny_cfg(tmp_path, iters=1)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    stale = ["checkpoint.pt.tmp", "metrics.json.tmp", "config.json.tmp", "log.csv.tmp"]
    others = ["eval_scenes_val.json.tmp", "notes.tmp", "checkpoint.pt.bak"]     # not the training's own
    for name in stale + others:
        (run_dir / name).write_bytes(b"torn")
    with DirectoryLock(run_dir), pytest.raises(DirectoryInUseError):    # another training holds it: left alone
        train(cfg)
    assert all((run_dir / name).exists() for name in stale + others)
    train(cfg)
    assert not any((run_dir / name).exists() for name in stale)
    assert all((run_dir / name).read_bytes() == b"torn" for name in others)


def test_ddp_is_asked_for_no_buffer_broadcast_in_the_words_of_its_torch(monkeypatch):
    import torch.nn as nn

    from gmmseg_core import train as train_module

    class OldDDP:       # the keywords of torch before 2.14
        def __init__(self, module, device_ids=None, broadcast_buffers=True, process_group=None):
            pass

    class NewDDP:       # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers
        def __init__(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=None):
            pass

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", OldDDP)
    assert train_module._no_buffer_sync() == {"broadcast_buffers": False}
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", NewDDP)
    assert train_module._no_buffer_sync() == {"forward_sync_buffers": False}
