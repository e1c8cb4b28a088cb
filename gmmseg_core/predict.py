"""A trained model applied to image files: label maps, anomaly-score heat maps and arrays per image.

``find_images``        the image files of files and folders given (folders: their .png/.jpg/.jpeg, sorted)
``read_image``         one file as an (H, W, 3) uint8 RGB array (Pillow)
``check_images``       the files' headers, to report a file that is not an image before predicting anything
``output_stems``       a distinct output name for each input, also when two inputs share a file name
``check_mode``         the inference options' errors, before any image is read
``check_out_dir``      an output folder that is a file or an input folder, refused before anything is written
``predict_images``     labels and anomaly scores of each image, one image at a time
``write_prediction``   ``<stem>_labels.png``, ``<stem>_<scorer>.png`` and optionally ``<stem>.npz``
``predict_files``      all of the above for a run's model; ``gmmseg predict`` calls it

Image size: every image is predicted at its own size (upright, as its EXIF orientation says), neither resized
nor padded here. The models are convolutional and return logits at their input's size for any size (the built-in
backbones interpolate their stride-8/16/32 maps back to it; an smp backbone pads to its size divisor itself and
crops again), so the label map and the scores have the input's size exactly, and an image's pixels are what the
model sees. Resizing to the training size would stretch images of another aspect ratio; the scale matters all
the same (a model trained on 64x128 scenes sees a 2048-pixel photo as tiny, unfamiliar structures), so images
should be brought near the training resolution beforehand. ``mode="slide"`` runs windows of ``crop_size``
instead, as ``gmmseg evaluate``.
Only smp's PAN refuses small images (sides under 128 pixels once padded): the error names the image.

Heat maps: each scorer's map (higher = more anomalous) is drawn with matplotlib's ``magma`` colour map, scaled
per image from the image's smallest finite score (black) to its largest (pale yellow); a constant map is black.
The scale is per image, not shared across the images of a call, because images are predicted and written one
at a time (bounded memory; an interrupted call leaves complete outputs) and a shared scale would make one
image's colours depend on which other images were passed with it. Colours therefore compare the pixels of one
image, not images; the raw scores (``save_arrays``) and the scale of each map (``predict_files``' summary)
compare images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gmmseg_core._files import atomic_write, atomic_write_text, progress_bar
from gmmseg_core.data.base import IGNORE_INDEX, SegmentationDataset, make_palette
from gmmseg_core.data.classnames import CITYSCAPES_PALETTE
from gmmseg_core.evaluate import _eval_mode, default_scorers, predict, slide_window
from gmmseg_core.scoring import compute_scores, scorer_names

__all__ = ["IMAGE_SUFFIXES", "HEATMAP_CMAP", "ImagePrediction", "find_images", "read_image", "check_images",
           "output_stems", "check_mode", "check_out_dir", "predict_images", "heatmap", "colorize_labels",
           "write_prediction", "run_labelling", "predict_files"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HEATMAP_CMAP = "magma"
SUMMARY = "predictions.json"


@dataclass
class ImagePrediction:
    """The prediction of one image file.

    Attributes
    ----------
    path : Path
    labels : numpy.ndarray
        (H, W) int64 predicted class ids (argmax of the logits).
    scores : dict of str -> numpy.ndarray
        ``{scorer: (H, W) float32}`` anomaly scores, higher = more anomalous.
    """

    path: Path
    labels: np.ndarray
    scores: dict


def _is_image_name(path: Path) -> bool:
    # hidden files are left out: "._x.png" is the resource fork macOS writes beside x.png on some file systems
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def find_images(inputs: Iterable) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders as their ``.png`` / ``.jpg`` / ``.jpeg``
    files (any case; not hidden ones, not those of subfolders) sorted by name; in the order of ``inputs``, each
    file once.

    Raises ``FileNotFoundError`` for an input that does not exist and ``ValueError`` naming the inputs when they
    hold no image.
    """
    inputs = [Path(p) for p in inputs]
    found, seen = [], set()
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
        files = sorted(p for p in path.iterdir() if _is_image_name(p)) if path.is_dir() else [path]
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.append(f)
    if not found:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in inputs]}")
    return found


def _rgb(image) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8 RGB."""
    if image.mode.startswith("I"):
        # 16-bit grey ("I;16", "I" in older Pillow): its high byte, as Pillow reads 16-bit colour; Pillow's own
        # conversion would clip every value above 255 to white
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


@contextmanager
def _opened_image(path) -> Iterator:
    """``PIL.Image.open(path)`` as a context, where Pillow's errors for a file it cannot read, on opening or inside
    the block (not an image, truncated, unreadable, a decompression bomb), become a ``ValueError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            yield im
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read the image {str(path)!r}: {err}") from err


def read_image(path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (grey, 16-bit grey, palette and RGBA images are converted; alpha is
    dropped), turned upright as its EXIF orientation says (as image viewers show it: a camera's portrait photo is
    often stored sideways with such a tag).

    Raises ``ValueError`` naming the file when Pillow cannot read it.
    """
    from PIL import ImageOps

    with _opened_image(path) as im:
        return _rgb(ImageOps.exif_transpose(im))


def check_images(paths: Iterable) -> None:
    """``ValueError`` naming the first of ``paths`` that Pillow does not recognise as an image, found from the
    files' headers only (fast; a file damaged further on fails when :func:`read_image` reads it)."""
    for path in paths:
        with _opened_image(path):
            pass


def output_stems(paths: Sequence, endings: Sequence[str] = ("_labels.png", ".npz")) -> list[str]:
    """A distinct output stem for each of ``paths``: its file name's stem, and for a stem that an earlier path
    already has (``a/x.png`` and ``b/x.jpg``; compared ignoring case, as some file systems do) the stem followed
    by ``_2``, ``_3``, ... (the first number that is no input's stem).

    ``endings`` are what the caller appends to a stem to name its files (``"_labels.png"``, ``"_msp.png"``,
    ``".npz"``): a stem is also renamed when one of its file names would be one of an earlier input's.
    """
    stems = [Path(p).stem for p in paths]
    taken = {s.casefold() for s in stems}
    names: set[str] = set()

    def clashes(candidate: str) -> bool:
        return any((candidate + e).casefold() in names for e in endings)

    out = []
    for stem in stems:
        candidate, k = stem, 1
        while clashes(candidate) or (candidate != stem and candidate.casefold() in taken):
            k += 1
            candidate = f"{stem}_{k}"
        names.update((candidate + e).casefold() for e in endings)
        taken.add(candidate.casefold())
        out.append(candidate)
    return out


def check_mode(mode: str, crop_size=None, stride=None) -> tuple:
    """``ValueError`` for inference options :func:`~gmmseg_core.evaluate.predict` would refuse, before any
    image is read: an unknown ``mode``, window options without ``"slide"``, a missing or bad ``crop_size``, a
    bad ``stride`` or one larger than the window.

    Returns ``(crop_size, stride)``, each a ``[height, width]`` list of ints, or None where not given.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "whole":
        if crop_size is not None or stride is not None:
            raise ValueError("crop_size and stride apply to mode 'slide'")
        return None, None
    crop, step = slide_window(crop_size, stride)
    return list(crop), (None if stride is None else list(step))


def check_out_dir(out_dir, inputs: Iterable) -> None:
    """``ValueError`` when ``out_dir`` is a file or one of the ``inputs`` folders (whose images a later call would
    take the outputs for)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output directory {str(out_dir)!r} is a file")
    if any(Path(p).is_dir() and Path(p).resolve() == out_dir.resolve() for p in inputs):
        raise ValueError(f"the output directory {str(out_dir)!r} is an input folder: a later call would read its "
                         "label maps and heat maps as images; write them to another folder")


def _normalizer():
    """The data sets' normalisation (ImageNet mean and std) when the run's data set cannot be built."""
    return SegmentationDataset("predict")


def _scorers(model, scorers, sml_stats) -> list[str]:
    """The scorer names to compute (default :func:`~gmmseg_core.evaluate.default_scorers`), checked against
    the model and ``sml_stats``."""
    scorers = list(dict.fromkeys(scorer_names(default_scorers(model, sml_stats) if scorers is None else scorers)))
    if "gmm" in scorers and not getattr(model, "is_generative", False):
        raise ValueError("scorer 'gmm' needs a GMM model (head='gmm'); this model has a softmax head")
    if "sml" in scorers and sml_stats is None:
        raise ValueError("scorer 'sml' needs sml_stats: compute them with evaluate.collect_sml_statistics(model, "
                         "train_dataset)")
    return scorers


@torch.no_grad()
def predict_images(model, paths: Sequence, scorers=None, sml_stats=None, normalizer=None, mode: str = "whole",
                   crop_size=None, stride=None, device=None, progress: bool = False) -> Iterator[ImagePrediction]:
    """Predict each image file, one at a time.

    Parameters
    ----------
    model : SegmentationModel
    paths : sequence of str or Path
        Image files (see :func:`find_images`).
    scorers : list of str, optional
        Names of :data:`gmmseg_core.scoring.SCORERS`; default :func:`~gmmseg_core.evaluate.default_scorers`
        (the logit scores, ``sml`` when ``sml_stats`` are given, ``gmm`` for a GMM model).
    sml_stats : dict, optional
        For ``sml``: :func:`~gmmseg_core.evaluate.collect_sml_statistics` on the training split.
    normalizer : SegmentationDataset, optional
        Its :meth:`~gmmseg_core.data.base.SegmentationDataset.normalize` turns the (H, W, 3) uint8 image into
        the model's input (3, H, W); default the data sets' ImageNet normalisation.
    mode, crop_size, stride : see :func:`gmmseg_core.evaluate.predict`
    device : torch.device or str, optional (default cpu); the model is moved there
    progress : bool

    Yields
    ------
    ImagePrediction
        Labels (H, W) and scores (H, W) at the image's own size.
    """
    scorers = _scorers(model, scorers, sml_stats)
    check_mode(mode, crop_size, stride)
    normalizer = normalizer if normalizer is not None else _normalizer()
    device = torch.device(device) if device is not None else torch.device("cpu")
    model.to(device)
    with _eval_mode(model):
        for path in progress_bar(list(paths), desc="predict", disable=not progress, leave=False):
            image = normalizer.normalize(read_image(path))[None].to(device)
            try:
                outputs = predict(model, image, mode=mode, crop_size=crop_size, stride=stride,
                                  with_likelihood="gmm" in scorers)
            except ValueError as err:       # e.g. an image smaller than the model takes
                h, w = image.shape[-2:]
                raise ValueError(f"the image {str(path)!r} ({h}x{w}) cannot be predicted: {err}") from err
            labels = outputs["logits"].max(dim=1).indices[0]     # as evaluate_closed_set
            scores = compute_scores(outputs, scorers, sml_stats=sml_stats)
            yield ImagePrediction(Path(path), labels.cpu().numpy(),
                                  {k: v[0].float().cpu().numpy() for k, v in scores.items()})


def heatmap(score: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """A score map (H, W) as an RGB image (H, W, 3) uint8 in :data:`HEATMAP_CMAP`, scaled from its smallest
    finite value to its largest (see the module docstring); ``+inf`` is drawn as the largest, ``-inf`` and NaN
    as the smallest. Returns the image and the ``(low, high)`` scale (NaN, NaN when no value is finite)."""
    import matplotlib

    score = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(score)
    if not finite.any():
        lo = hi = float("nan")
        unit = np.where(score == np.inf, 1.0, 0.0)
    else:
        lo, hi = float(score[finite].min()), float(score[finite].max())
        span = hi - lo
        unit = np.zeros_like(score) if span == 0 else (np.where(finite, score, lo) - lo) / span
        unit = np.where(score == np.inf, 1.0, unit)
    rgba = matplotlib.colormaps[HEATMAP_CMAP](np.clip(unit, 0.0, 1.0), bytes=True)
    return np.ascontiguousarray(rgba[..., :3]), (lo, hi)


def colorize_labels(labels: np.ndarray, palette) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3) uint8 in ``palette`` (C, 3) uint8; ids outside it are black, and no id
    is ignored (with more than 255 classes, 255 is a class): :func:`gmmseg_core.plots.colorize` in bytes."""
    from gmmseg_core.plots import colorize

    return np.rint(colorize(labels, np.asarray(palette, dtype=np.uint8), ignore_index=-1) * 255).astype(np.uint8)


def _write_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    return atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


def _write_npz(path: Path, arrays: dict) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:      # a file object: np.savez would add ".npz" to the temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= IGNORE_INDEX else np.int16


def write_prediction(prediction: ImagePrediction, out_dir, stem: str, palette, classes: Sequence[str],
                     save_arrays: bool = False) -> dict:
    """Write one image's outputs into ``out_dir`` (atomically; files of the same names are replaced).

    ``<stem>_labels.png``: the labels in ``palette`` colours; ``<stem>_<scorer>.png``: each score's heat map
    (:func:`heatmap`); with ``save_arrays``, ``<stem>.npz`` holding ``labels`` (H, W) (uint8, int16 beyond 255
    classes), one float32 (H, W) array per scorer under its name, and ``classes`` (C,) str.

    Returns
    -------
    dict: ``files`` (the paths written, as strings) and ``scale`` (``{scorer: [low, high]}`` of the heat maps,
    None for a map without a finite score).
    """
    out_dir = Path(out_dir)
    files = [_write_png(out_dir / f"{stem}_labels.png", colorize_labels(prediction.labels, palette))]
    scale = {}
    for name, score in prediction.scores.items():
        rgb, scale[name] = heatmap(score)
        files.append(_write_png(out_dir / f"{stem}_{name}.png", rgb))
    if save_arrays:
        arrays = {"labels": prediction.labels.astype(_label_dtype(len(classes))),
                  **{name: np.asarray(s, dtype=np.float32) for name, s in prediction.scores.items()},
                  "classes": np.array(list(classes), dtype=str)}
        files.append(_write_npz(out_dir / f"{stem}.npz", arrays))
    scale = {k: [None if np.isnan(v) else v for v in pair] for k, pair in scale.items()}   # JSON has no NaN
    return {"files": [str(f) for f in files], "scale": scale}


def run_labelling(cfg, num_classes: int, metrics: dict | None = None):
    """``(classes, palette, normalizer)`` of a run: those of its training data set's validation split, or, where
    that cannot be built here (a data set read from files that are elsewhere), the class names ``metrics.json``
    recorded (``class <i>`` otherwise), the Cityscapes colours for a Cityscapes run and
    :func:`~gmmseg_core.data.base.make_palette` colours for others (those of ADE20K and COCO-Stuff), and the
    ImageNet normalisation every registered data set uses."""
    from gmmseg_core.data import build_dataset
    from gmmseg_core.train import dataset_kwargs_for

    try:
        dataset = build_dataset(cfg.dataset, "val", root=cfg.data_root, **dataset_kwargs_for(cfg, "val"))
    except (ValueError, OSError):
        dataset = None
    if dataset is not None and dataset.num_classes == num_classes and len(dataset.palette) >= num_classes:
        return list(dataset.classes), np.asarray(dataset.palette, dtype=np.uint8), dataset
    classes = list((metrics or {}).get("classes") or [])
    if len(classes) != num_classes:
        classes = [f"class {i}" for i in range(num_classes)]
    palette = CITYSCAPES_PALETTE if cfg.dataset == "cityscapes" and num_classes == 19 else make_palette(num_classes)
    return classes, palette.copy(), _normalizer()


def predict_files(model, inputs: Iterable, out_dir, classes: Sequence[str], palette, scorers=None,
                  sml_stats=None, normalizer=None, mode: str = "whole", crop_size=None, stride=None, device=None,
                  save_arrays: bool = False, progress: bool = False) -> dict:
    """Predict the images of ``inputs`` (files and folders, see :func:`find_images`) and write their outputs
    (:func:`write_prediction`) into ``out_dir``, with a summary ``predictions.json``.

    Parameters
    ----------
    model : SegmentationModel
    inputs : iterable of str or Path
    out_dir : str or Path
        Created if needed.
    classes : sequence of str
        The model's class names (C,).
    palette : array-like (C, 3) uint8
    scorers, sml_stats, normalizer, mode, crop_size, stride, device, progress : see :func:`predict_images`
    save_arrays : bool

    Returns
    -------
    dict: ``classes``, ``scorers``, ``mode``, ``crop_size`` and ``stride`` (``[height, width]``, None where not
    given), ``heatmap_cmap``, ``heatmap_scale`` and ``images``, a list with per image
    ``input`` (its path), ``stem`` (its outputs' name, see :func:`output_stems`), ``size`` ([H, W]),
    ``files`` and ``scale``; also written to ``<out_dir>/predictions.json`` once every image is done (a call
    that stops early leaves none, rather than an earlier call's).
    """
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and len(classes) != int(num_classes):
        raise ValueError(f"{len(classes)} class names for a model that predicts {int(num_classes)} classes")
    scorers = _scorers(model, scorers, sml_stats)
    window = check_mode(mode, crop_size, stride)      # as plain ints for the JSON summary
    inputs = [Path(p) for p in inputs]
    paths = find_images(inputs)
    check_images(paths)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    # an earlier call's summary would describe outputs that this call replaces, also if this one stops early
    (out_dir / SUMMARY).unlink(missing_ok=True)
    stems = output_stems(paths, ["_labels.png", *(f"_{s}.png" for s in scorers), ".npz"])
    images = []
    predictions = predict_images(model, paths, scorers=scorers, sml_stats=sml_stats, normalizer=normalizer,
                                 mode=mode, crop_size=crop_size, stride=stride, device=device, progress=progress)
    for stem, prediction in zip(stems, predictions):
        written = write_prediction(prediction, out_dir, stem, palette, classes, save_arrays=save_arrays)
        images.append({"input": str(prediction.path), "stem": stem, "size": list(prediction.labels.shape),
                       **written})
    summary = {"classes": list(classes), "scorers": scorers, "mode": mode, "crop_size": window[0],
               "stride": window[1], "heatmap_cmap": HEATMAP_CMAP, "heatmap_scale": "per image", "images": images}
    atomic_write_text(out_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
