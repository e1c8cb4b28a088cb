import numpy as np
import pytest
import torch

from gmmseg_core.data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    available_datasets,
    build_dataset,
    check_dataset_arguments,
    dataset_info,
    dataset_options,
    dataset_splits,
    register_dataset,
    registry,
)

ALL = ["ade20k", "cityscapes", "cocostuff", "digits", "fashion", "fishyscapes_lf", "fishyscapes_static",
       "road_anomaly", "scenes", "smiyc_anomaly", "smiyc_obstacle"]


def test_every_contract_name_is_registered():
    assert available_datasets() == ALL
    assert dataset_splits("scenes") == ("train", "val", "anomaly", "anomaly_near")
    assert dataset_splits("fashion") == ("train", "val", "anomaly")
    assert dataset_splits("road_anomaly") == ("anomaly",)
    assert dataset_info("cityscapes").needs_root and not dataset_info("scenes").needs_root


def test_unknown_name_and_split_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; available datasets: ade20k, cityscapes"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="unknown split 'anomaly' for dataset 'cityscapes'; valid splits: train, val"):
        build_dataset("cityscapes", "anomaly")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("scenes", ("train",))(lambda split, root=None: None)


def test_unknown_options_are_refused_listing_the_accepted_ones(tmp_path):
    with pytest.raises(ValueError, match=r"dataset options \['foo'\] are not arguments of dataset 'scenes'; "
                                         r"it takes \['image_size', 'num_images', "):
        build_dataset("scenes", "train", foo=1)
    with pytest.raises(ValueError, match=r"dataset_kwargs \['cache_dir'\] are not arguments of dataset "
                                         r"'cityscapes'; it takes \['image_size', 'num_images', 'transform'\]"):
        check_dataset_arguments("cityscapes", {"num_images": 2, "cache_dir": "x"})
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        check_dataset_arguments("mnist", {})
    check_dataset_arguments("digits", {"held_out": ["8"], "objects": [1, 2], "image_size": 16})
    assert "held_out" in dataset_options("fashion") and "root" not in dataset_options("cityscapes")


# a value for every option of the generated datasets (the defaults, small)
EVERY_OPTION = dict(image_size=16, num_images=1, seed=0, height=None, width=None, void_width=None, cache=False,
                    cache_dir=None, transform=None, objects=(2, 4), held_out=("8", "9"))


@pytest.mark.parametrize("name", ["scenes", "digits"])
def test_every_listed_option_is_taken(name):
    options = dataset_options(name)
    assert set(options) <= set(EVERY_OPTION)
    split = "val" if name == "scenes" else "anomaly"
    assert len(build_dataset(name, split, **{k: EVERY_OPTION[k] for k in options})) == 1


def test_options_of_other_factories(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_dataset("explicit", ("train",))(lambda split, root=None, size=1: None)
    register_dataset("open", ("train",))(lambda split, root=None, **kw: None)
    assert dataset_options("explicit") == ("size",) and dataset_options("open") is None
    with pytest.raises(ValueError, match=r"dataset_kwargs \['sise'\] are not arguments of dataset 'explicit'; "
                                         r"it takes \['size'\]"):
        check_dataset_arguments("explicit", {"sise": 2})
    check_dataset_arguments("open", {"anything": 1})


def test_normalisation_contract():
    ds = build_dataset("digits", "val", num_images=1, image_size=16)
    assert ds.ignore_index == IGNORE_INDEX == 255 and ds.mean == IMAGENET_MEAN
    raw, _ = ds.load(0)
    image, _ = ds[0]
    expected = (raw.astype(np.float32) / 255 - np.array(ds.mean, np.float32)) / np.array(ds.std, np.float32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    batch = torch.stack([image, image])
    assert ds.denormalize(batch).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="image must have shape"):
        ds.denormalize(torch.zeros(4, 4))
    assert ds.colorize(torch.tensor([[0, 255]])).shape == (1, 2, 3)


@pytest.mark.parametrize("layout", ["uint8", "float32", "flipped float32"])
def test_normalize_is_the_numpy_expression_bit_for_bit(layout):
    ds = build_dataset("digits", "val", num_images=1, image_size=16)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    if layout != "uint8":
        image = image.astype(np.float32) + rng.random((16, 24, 3), dtype=np.float32)
    if layout.startswith("flipped"):
        image = image[:, ::-1]  # a negative-stride view, as a horizontal-flip augmentation returns
    mean = np.asarray(ds.mean, dtype=np.float32) * 255.0
    std = np.asarray(ds.std, dtype=np.float32) * 255.0
    expected = np.ascontiguousarray(((image.astype(np.float32) - mean) / std).transpose(2, 0, 1))
    out = ds.normalize(image)
    assert out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == (3, 16, 24)
    assert torch.equal(out, torch.from_numpy(expected))


def test_a_dataset_that_needs_a_root_must_read_it():
    with pytest.raises(ValueError, match=r"dataset 'x': a dataset that needs a root reads it \(needs_root=True, "
                                         r"reads_root=False\)"):
        register_dataset("x", ("train",), needs_root=True, reads_root=False)
    assert "x" not in available_datasets()
