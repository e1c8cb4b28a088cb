import json

import numpy as np
import pytest

from gmmseg_core.data import ClassBalancedSampler, build_dataset, class_balanced_sampler
from gmmseg_core.data.sampler import class_image_index


class ToyLabels:
    """20 label maps: class 0 everywhere, class 1 in images 0-1, class 2 in images 0-4, class 3 in image 19."""

    num_classes = 4

    def __init__(self):
        self.calls = 0
        self.labels = []
        for i in range(20):
            lab = np.zeros((4, 4), np.int64)
            if i < 2:
                lab[0, 0] = 1
            if i < 5:
                lab[1, 1] = 2
            if i == 19:
                lab[2, 2] = 3
            lab[3, 3] = 255
            self.labels.append(lab)

    cache_key = "toy-labels-v1"

    def __len__(self):
        return len(self.labels)

    def load_label(self, i):
        self.calls += 1
        return self.labels[i]


def test_index_lists_images_per_class_and_is_cached(tmp_path):
    ds = ToyLabels()
    index = class_image_index(ds, cache_dir=tmp_path)
    assert index == {0: list(range(20)), 1: [0, 1], 2: [0, 1, 2, 3, 4], 3: [19]}
    files = list(tmp_path.glob("class_index-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == "toy-labels-v1"
    calls = ds.calls
    assert class_image_index(ds, cache_dir=tmp_path) == index and ds.calls == calls  # read back, no relabelling


def test_sampling_matches_class_then_image_distribution(tmp_path):
    ds = ToyLabels()
    sampler = ClassBalancedSampler(ds, num_samples=20000, seed=0, cache_dir=tmp_path)
    counts = np.bincount(list(sampler), minlength=20) / 20000
    index = class_image_index(ds, cache_dir=tmp_path)
    expected = np.zeros(20)
    for imgs in index.values():
        expected[imgs] += 1 / len(index) / len(imgs)
    np.testing.assert_allclose(counts, expected, atol=0.01)
    # each class is seen in about 1/4 of draws or more (image 19 carries the rare class 3)
    assert counts[19] > 0.25


def test_scenes_classes_roughly_uniform(tmp_path):
    ds = build_dataset("scenes", "train", num_images=40, image_size=(32, 64))
    sampler = class_balanced_sampler(ds, num_samples=4000, seed=1, cache_dir=tmp_path)
    index = sampler.index
    drawn = np.bincount(list(sampler), minlength=len(ds))
    # P(image contains c) under class-balanced sampling >= 1/C for every class
    for c, imgs in index.items():
        assert drawn[imgs].sum() / 4000 > 1 / len(index) - 0.03, c


def test_deterministic_epochs_and_sharding(tmp_path):
    ds = ToyLabels()
    a = ClassBalancedSampler(ds, num_samples=11, seed=3, cache_dir=tmp_path)
    b = ClassBalancedSampler(ds, num_samples=11, seed=3, cache_dir=tmp_path)
    assert list(a) == list(b) and len(a) == 11
    a.set_epoch(1)
    assert list(a) != list(b)
    ranks = [ClassBalancedSampler(ds, num_samples=11, seed=3, rank=r, world_size=3, cache_dir=tmp_path)
             for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    full = ranks[0].global_indices()
    assert len(full) == 12
    for r, s in enumerate(ranks):
        assert list(s) == full[r::3].tolist()


def test_parameter_errors(tmp_path):
    ds = ToyLabels()
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        ClassBalancedSampler(ds, rank=2, world_size=2, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        ClassBalancedSampler(ds, num_samples=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no labelled pixels"):
        ClassBalancedSampler(ds, index={}, cache_dir=tmp_path)


@pytest.mark.parametrize("kw, message", [
    (dict(num_samples=2.5), "num_samples must be a positive int, got 2.5"),
    (dict(num_samples="3"), "num_samples must be a positive int, got '3'"),
    (dict(num_samples=True), "num_samples must be a positive int, got True"),
    (dict(world_size=True, rank=0), "world_size must be a positive int, got True"),
    (dict(world_size=2.0, rank=0), "world_size must be a positive int, got 2.0"),
    (dict(world_size=2, rank=0.5), r"rank must be an int in \[0, 2\), got 0.5"),
    (dict(seed=-1), "seed must be an int >= 0, got -1"),
    (dict(seed="1"), "seed must be an int >= 0, got '1'"),
])
def test_integer_arguments_are_not_truncated_or_parsed(tmp_path, kw, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ClassBalancedSampler(ToyLabels(), cache_dir=tmp_path, **kw)


def test_numpy_integer_arguments_draw_as_ints(tmp_path):
    kw = dict(num_samples=11, seed=3, rank=1, world_size=3)
    numpy_kw = {k: np.int64(v) for k, v in kw.items()}
    assert (list(ClassBalancedSampler(ToyLabels(), cache_dir=tmp_path, **numpy_kw))
            == list(ClassBalancedSampler(ToyLabels(), cache_dir=tmp_path, **kw)))


def test_an_empty_dataset_is_named(tmp_path):
    empty = ToyLabels()
    empty.labels = []
    with pytest.raises(ValueError, match="the dataset is empty"):
        ClassBalancedSampler(empty, cache_dir=tmp_path)


def test_the_ignore_label_is_never_a_class_even_without_num_classes(tmp_path):
    class NoClassCount(ToyLabels):
        num_classes = None

    assert 255 not in class_image_index(NoClassCount(), cache_dir=False)


def test_classes_without_images_are_not_drawn():
    sampler = ClassBalancedSampler(ToyLabels(), num_samples=50, index={0: [3], 1: []}, seed=0)
    assert set(sampler) == {3}
