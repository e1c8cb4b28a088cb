"""``gmmseg predict`` and :mod:`gmmseg_core.predict`: a trained run applied to image files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gmmseg_core.cli import main
from gmmseg_core.data import build_dataset
from gmmseg_core.evaluate import predict
from gmmseg_core.models import build_model
from gmmseg_core.predict import (
    ImagePrediction,
    find_images,
    heatmap,
    output_stems,
    predict_files,
    predict_images,
    read_image,
    write_prediction,
)
from gmmseg_core.scoring import SCORERS

TINY = ["--arch", "fcn", "--iters", "2", "--batch-size", "2", "--image-size", "32", "--no-progress",
        "--set", "model_kwargs.width=4", "--set", 'head_kwargs={"embed_dim": 4, "num_components": 2}',
        "--set", "dataset_kwargs.num_images=4", "--set", 'val_dataset_kwargs={"num_images": 2}']


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny finished GMM run on 32x32 scenes (trained once for the module)."""
    out = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    assert main(["train", *TINY, "--out-dir", str(out), "--run-name", "gmm"]) == 0
    return out / "gmm"


@pytest.fixture(scope="module")
def model(run_dir):
    from gmmseg_core.train import load_run

    return load_run(run_dir)[0]


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _random_image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_a_scenes_image_saved_as_png_is_predicted_as_evaluate_predicts_its_pixels(model, tmp_path):
    ds = build_dataset("scenes", "val", image_size=32, num_images=1)
    image, _ = ds.load(0)
    path = _save(tmp_path / "scene.png", image)
    (got,) = predict_images(model, [path], scorers=["msp", "energy", "gmm"])

    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(pixels, image)
    outputs = predict(model, ds.normalize(pixels)[None], with_likelihood=True)
    assert np.array_equal(got.labels, outputs["logits"].argmax(1)[0].numpy())
    for name in ("msp", "energy", "gmm"):
        np.testing.assert_allclose(got.scores[name], SCORERS[name](outputs)[0].numpy(), rtol=1e-6, atol=1e-6)
    (slid,) = predict_images(model, [path], scorers=["msp"], mode="slide", crop_size=24, stride=8)
    windows = predict(model, ds.normalize(pixels)[None], mode="slide", crop_size=24, stride=8)
    assert np.array_equal(slid.labels, windows["logits"].argmax(1)[0].numpy())


@pytest.mark.parametrize("mode, window", [("whole", {}), ("slide", {"crop_size": 16, "stride": 10})])
def test_outputs_have_the_input_size_for_odd_sizes(model, tmp_path, mode, window):
    _save(tmp_path / "in" / "odd.png", _random_image((33, 47, 3)))
    _save(tmp_path / "in" / "grey.png", _random_image((19, 5), seed=1))                 # converted to RGB
    _save(tmp_path / "in" / "rgba.png", _random_image((7, 30, 4), seed=2))
    summary = predict_files(model, [tmp_path / "in"], tmp_path / "out", [f"c{i}" for i in range(8)],
                            np.zeros((8, 3), np.uint8), scorers=["msp", "gmm"], mode=mode, save_arrays=True,
                            **window)
    sizes = {"odd": (33, 47), "grey": (19, 5), "rgba": (7, 30)}
    assert {im["stem"]: tuple(im["size"]) for im in summary["images"]} == sizes
    for stem, (h, w) in sizes.items():
        for suffix in ("labels", "msp", "gmm"):
            assert Image.open(tmp_path / "out" / f"{stem}_{suffix}.png").size == (w, h)
        with np.load(tmp_path / "out" / f"{stem}.npz") as z:
            assert z["labels"].shape == z["msp"].shape == z["gmm"].shape == (h, w)


def test_folders_are_searched_for_images_in_name_order_and_each_file_is_taken_once(tmp_path):
    for name in ("b.png", "a.JPG", "c.jpeg", "notes.txt", "._b.png", "sub/d.png", "other/z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    loose = tmp_path / "other" / "z.png"
    found = find_images([loose, tmp_path, tmp_path / "b.png"])
    assert [p.name for p in found] == ["z.png", "a.JPG", "b.png", "c.jpeg"]


def test_inputs_sharing_a_name_get_distinct_outputs(model, tmp_path, capsys, run_dir):
    _save(tmp_path / "a" / "x.png", _random_image((12, 12, 3), seed=1))
    _save(tmp_path / "b" / "x.jpg", _random_image((10, 14, 3), seed=2))
    _save(tmp_path / "b" / "x_2.png", _random_image((9, 9, 3), seed=3))
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), str(tmp_path / "a"), str(tmp_path / "b"), "--out-dir", str(out),
                 "--scorers", "msp", "--no-progress"]) == 0
    assert f"{str(tmp_path / 'b' / 'x.jpg')!r} shares its name with an earlier input: its outputs are named " \
           "'x_3'" in capsys.readouterr().err
    sizes = {stem: Image.open(out / f"{stem}_labels.png").size for stem in ("x", "x_3", "x_2")}
    assert sizes == {"x": (12, 12), "x_3": (14, 10), "x_2": (9, 9)}
    summary = json.loads((out / "predictions.json").read_text())
    assert [(im["input"], im["stem"]) for im in summary["images"]] == [
        (str(tmp_path / "a" / "x.png"), "x"), (str(tmp_path / "b" / "x.jpg"), "x_3"),
        (str(tmp_path / "b" / "x_2.png"), "x_2")]


def test_output_stems_differ_ignoring_case_and_never_reuse_a_file_name():
    assert output_stems(["a/X.png", "b/x.png", "c/x.jpeg"]) == ["X", "x_2", "x_3"]
    # "p_labels.png" of p.png and the labels of an input named "p_labels" ("p_labels_labels.png") differ
    assert output_stems(["p.png", "p_labels.png"]) == ["p", "p_labels"]
    # x's "x_y.npz" would be x_y.png's "x_y.npz"
    assert output_stems(["x.png", "x_y.png"], endings=(".npz", "_y.npz")) == ["x", "x_y_2"]


def test_save_arrays_holds_the_labels_the_scores_and_the_class_names(model, tmp_path):
    _save(tmp_path / "im.png", _random_image((11, 13, 3)))
    classes = [f"class {i}" for i in range(8)]
    palette = np.arange(24, dtype=np.uint8).reshape(8, 3) * 10
    predict_files(model, [tmp_path / "im.png"], tmp_path / "out", classes, palette, save_arrays=True)
    (expected,) = predict_images(model, [tmp_path / "im.png"])
    assert sorted(expected.scores) == ["energy", "entropy", "gmm", "max_logit", "msp"]   # the defaults, no sml
    with np.load(tmp_path / "out" / "im.npz") as z:
        assert sorted(z.files) == sorted(["labels", "classes", *expected.scores])
        assert z["labels"].dtype == np.uint8 and np.array_equal(z["labels"], expected.labels)
        for name, score in expected.scores.items():
            assert z[name].dtype == np.float32 and np.array_equal(z[name], score)
        assert z["classes"].tolist() == classes
    rgb = np.asarray(Image.open(tmp_path / "out" / "im_labels.png"))
    assert np.array_equal(rgb, palette[expected.labels])
    plain = predict_files(model, [tmp_path / "im.png"], tmp_path / "plain", classes, palette, scorers=["msp", "msp"])
    assert plain["scorers"] == ["msp"]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["im_labels.png", "im_msp.png",
                                                                     "predictions.json"]


def test_labels_of_more_than_255_classes_are_saved_as_int16(tmp_path):
    labels = np.array([[0, 255], [299, 7]])
    prediction = ImagePrediction(tmp_path / "x.png", labels, {"msp": np.zeros((2, 2), np.float32)})
    write_prediction(prediction, tmp_path, "x", np.zeros((300, 3), np.uint8), [str(i) for i in range(300)],
                     save_arrays=True)
    with np.load(tmp_path / "x.npz") as z:
        assert z["labels"].dtype == np.int16 and np.array_equal(z["labels"], labels)


def test_heat_maps_span_the_colour_map_per_image():
    import matplotlib

    cmap = matplotlib.colormaps["magma"]
    low, high = (np.asarray(cmap(v, bytes=True)[:3]) for v in (0.0, 1.0))
    score = np.array([[2.0, 4.0], [3.0, np.inf], [-np.inf, np.nan]], dtype=np.float32)
    rgb, scale = heatmap(score)
    assert scale == (2.0, 4.0) and rgb.dtype == np.uint8 and rgb.shape == (3, 2, 3)
    assert np.array_equal(rgb[0, 0], low) and np.array_equal(rgb[0, 1], high)
    assert np.array_equal(rgb[1, 1], high) and np.array_equal(rgb[2, 0], low) and np.array_equal(rgb[2, 1], low)
    assert np.array_equal(rgb[1, 0], np.asarray(cmap(0.5, bytes=True)[:3]))
    assert np.array_equal(heatmap(score * 10 + 5)[0], rgb)        # the scale is the image's own
    flat, _ = heatmap(np.full((2, 2), 7.0))
    assert (flat == low).all()


def test_an_unreadable_image_is_named_before_anything_is_predicted(tmp_path, run_dir, capsys):
    _save(tmp_path / "in" / "a.png", _random_image((8, 8, 3)))
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the image .*broken.png"):
        read_image(bad)
    assert main(["predict", str(run_dir), str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gmmseg predict: error: cannot read the image {str(bad)!r}") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_image_the_model_cannot_take_is_named(tmp_path):
    class NeedsEightPixels(torch.nn.Module):
        num_classes, is_generative = 2, False

        def forward(self, images):
            if min(images.shape[-2:]) < 8:
                raise ValueError("sides of 8 pixels or more are needed")
            return images[:, :2]

    small = _save(tmp_path / "small.png", _random_image((4, 9, 3)))
    with pytest.raises(ValueError, match=r"the image .*small.png' \(4x9\) cannot be predicted: sides of 8"):
        predict_files(NeedsEightPixels(), [small], tmp_path / "out", ["a", "b"], np.zeros((2, 3)), scorers=["msp"])


def test_the_outputs_are_not_written_into_an_input_folder(tmp_path, model):
    _save(tmp_path / "photos" / "a.png", _random_image((8, 8, 3)))
    with pytest.raises(ValueError, match="the output directory .*photos' is an input folder"):
        predict_files(model, [tmp_path / "photos"], tmp_path / "photos" / ".." / "photos", [str(i) for i in range(8)],
                      np.zeros((8, 3)))
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.png"]


@pytest.mark.parametrize("args, message", [
    (["--scorers", "msp", "bogus"], "--scorers ['bogus'] are not scorers; choose from"),
    (["--crop-size", "16"], "--crop-size and --stride apply to --mode slide"),
    (["--stride", "8"], "--crop-size and --stride apply to --mode slide"),
    (["--mode", "slide"], "--mode slide needs --crop-size"),
    (["--mode", "slide", "--crop-size", "0"], "crop_size must be a positive int"),
    (["--mode", "slide", "--crop-size", "8", "--stride", "9"], "stride (9, 9) must not exceed crop_size (8, 8)"),
    (["--sml-images", "-1"], "--sml-images must be >= 0"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, run_dir, capsys, args, message):
    _save(tmp_path / "in" / "a.png", _random_image((8, 8, 3)))
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), str(tmp_path / "in"), "--out-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmmseg predict: error: ") and message in err
    assert not out.exists()


def test_missing_runs_inputs_and_empty_folders_are_reported(tmp_path, run_dir, capsys):
    image = _save(tmp_path / "a.png", _random_image((8, 8, 3)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    (tmp_path / "file").write_text("")
    cases = [
        ([str(tmp_path / "no_run"), str(image)], f"no checkpoint.pt in run directory {str(tmp_path / 'no_run')!r}"),
        ([str(run_dir), str(tmp_path / "missing.png")], f"input {str(tmp_path / 'missing.png')!r} does not exist"),
        ([str(run_dir), str(tmp_path / "empty")], f"no image files (.png, .jpg, .jpeg) in "
                                                  f"[{str(tmp_path / 'empty')!r}]"),
    ]
    for args, message in cases:
        assert main(["predict", *args, "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gmmseg predict: error: ") and message in err, err
    assert main(["predict", str(run_dir), str(image), "--out-dir", str(tmp_path / "file")]) == 2
    assert f"the output directory {str(tmp_path / 'file')!r} is a file" in capsys.readouterr().err
    (tmp_path / "photos").mkdir()
    _save(tmp_path / "photos" / "b.png", _random_image((8, 8, 3)))
    # refused before the run is read (its sml statistics can take minutes): a missing run is not reached
    assert main(["predict", str(tmp_path / "no_run"), str(tmp_path / "photos"), "--out-dir",
                 str(tmp_path / "photos")]) == 2
    assert f"the output directory {str(tmp_path / 'photos')!r} is an input folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_gmm_and_sml_scorers_need_what_they_score_with(tmp_path):
    softmax = build_model("fcn", head="softmax", num_classes=3, width=4)
    _save(tmp_path / "a.png", _random_image((8, 8, 3)))
    with pytest.raises(ValueError, match="scorer 'gmm' needs a GMM model"):
        predict_files(softmax, [tmp_path / "a.png"], tmp_path / "out", ["a", "b", "c"], np.zeros((3, 3)),
                      scorers=["gmm"])
    with pytest.raises(ValueError, match="scorer 'sml' needs sml_stats"):
        predict_files(softmax, [tmp_path / "a.png"], tmp_path / "out", ["a", "b", "c"], np.zeros((3, 3)),
                      scorers=["sml"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="2 class names for a model that predicts 3 classes"):
        predict_files(softmax, [tmp_path / "a.png"], tmp_path / "out", ["a", "b"], np.zeros((3, 3)))


def test_predict_end_to_end(tmp_path, run_dir, capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    help_text = capsys.readouterr().out
    assert "usage: gmmseg predict" in help_text and "gmmseg predict runs/my_run photos/ --out-dir" in help_text
    ds = build_dataset("scenes", "val", image_size=32, num_images=2)
    for i in range(2):
        _save(tmp_path / "photos" / f"scene{i}.jpg", ds.load(i)[0])
    out = tmp_path / "predictions"
    assert main(["predict", str(run_dir), str(tmp_path / "photos"), "--out-dir", str(out), "--scorers", "gmm",
                 "sml", "--sml-images", "2", "--save-arrays", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "2 images, scorers gmm sml; classes: 0 road, 1 sidewalk" in captured.out
    assert "not finished" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"scene{i}{s}" for i in range(2) for s in ("_labels.png", "_gmm.png", "_sml.png", ".npz")]
        + ["predictions.json"])
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["classes"] == ds.classes and summary["scorers"] == ["gmm", "sml"]
    with np.load(out / "scene0.npz") as z:
        labels = z["labels"]
        lo, hi = summary["images"][0]["scale"]["sml"]
        assert (lo, hi) == (float(z["sml"].min()), float(z["sml"].max()))
    rgb = np.asarray(Image.open(out / "scene0_labels.png"))
    assert np.array_equal(rgb, ds.palette[labels])        # the run's dataset colours

    metrics = run_dir / "metrics.json"
    finished = metrics.read_text()
    metrics.write_text(json.dumps({**json.loads(finished), "finished": False}))
    try:
        assert main(["predict", str(run_dir), str(tmp_path / "photos"), "--out-dir", str(out), "--no-progress"]) == 0
    finally:
        metrics.write_text(finished)
    assert f"gmmseg predict: note: the run in {str(run_dir)!r} is not finished" in capsys.readouterr().err


def test_a_photo_is_predicted_upright_as_its_exif_orientation_says(model, tmp_path):
    stored = _random_image((10, 24, 3))
    exif = Image.Exif()
    exif[0x0112] = 6                       # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "portrait.jpg").shape == (24, 10, 3)
    summary = predict_files(model, [tmp_path], tmp_path / "out", [str(i) for i in range(8)],
                            np.zeros((8, 3), np.uint8), scorers=["msp"])
    assert summary["images"][0]["size"] == [24, 10]
    assert Image.open(tmp_path / "out" / "portrait_labels.png").size == (10, 24)


def test_a_run_whose_data_is_elsewhere_is_labelled_with_its_recorded_classes(tmp_path):
    from gmmseg_core.config import TrainConfig
    from gmmseg_core.data.classnames import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    from gmmseg_core.predict import run_labelling

    cfg = TrainConfig(dataset="cityscapes", data_root=str(tmp_path / "absent"))
    classes, palette, normalizer = run_labelling(cfg, 19, {"classes": CITYSCAPES_CLASSES})
    assert classes == CITYSCAPES_CLASSES and np.array_equal(palette, CITYSCAPES_PALETTE)
    image = _random_image((4, 5, 3))
    scenes = build_dataset("scenes", "val", num_images=1)
    assert torch.equal(normalizer.normalize(image), scenes.normalize(image))
    classes, palette, _ = run_labelling(cfg.replace(dataset="ade20k"), 150, {})
    assert classes[:2] == ["class 0", "class 1"] and palette.shape == (150, 3)
    classes, palette, dataset = run_labelling(TrainConfig(dataset_kwargs={"num_images": 1}), 8, {})
    assert classes == scenes.classes and np.array_equal(palette, scenes.palette) and dataset.name == "scenes"


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    grey, low = _random_image((6, 7), seed=3), _random_image((6, 7), seed=4)
    Image.fromarray(grey.astype(np.uint16) * 256 + low).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode == "I;16"
    assert np.array_equal(read_image(tmp_path / "depth.png"), np.repeat(grey[..., None], 3, axis=-1))


def test_the_summary_records_numpy_window_sizes_as_plain_pairs(model, tmp_path):
    _save(tmp_path / "a.png", _random_image((20, 30, 3)))
    classes = [str(i) for i in range(8)]
    summary = predict_files(model, [tmp_path / "a.png"], tmp_path / "out", classes, np.zeros((8, 3), np.uint8),
                            scorers=["msp"], mode="slide", crop_size=np.int64(16), stride=np.array([8, 12]))
    assert (summary["crop_size"], summary["stride"]) == ([16, 16], [8, 12])
    assert json.loads((tmp_path / "out" / "predictions.json").read_text()) == summary
    default = predict_files(model, [tmp_path / "a.png"], tmp_path / "out", classes, np.zeros((8, 3), np.uint8),
                            scorers=["msp"], mode="slide", crop_size=(12, 16))
    assert (default["crop_size"], default["stride"]) == ([12, 16], None)


def test_a_call_that_stops_early_leaves_no_summary_of_an_earlier_call(model, tmp_path):
    classes, palette = [str(i) for i in range(8)], np.zeros((8, 3), np.uint8)
    _save(tmp_path / "in" / "a.png", _random_image((8, 8, 3)))
    predict_files(model, [tmp_path / "in"], tmp_path / "out", classes, palette, scorers=["msp"])
    assert (tmp_path / "out" / "predictions.json").exists()
    _save(tmp_path / "in" / "b.png", _random_image((8, 8, 3), seed=1))
    torn = tmp_path / "in" / "c.png"
    torn.write_bytes((tmp_path / "in" / "b.png").read_bytes()[:60])     # a header, then nothing
    with pytest.raises(ValueError, match="cannot read the image .*c.png"):
        predict_files(model, [tmp_path / "in"], tmp_path / "out", classes, palette, scorers=["energy"])
    assert (tmp_path / "out" / "b_energy.png").exists()        # the images before the failure are written
    assert not (tmp_path / "out" / "predictions.json").exists()
