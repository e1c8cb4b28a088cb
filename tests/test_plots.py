"""Plot helpers: the inputs the notebooks can hand them, empty ones included."""

import numpy as np
import pytest

from gmmseg_core.plots import image_grid, pad_curves


def test_pad_curves_carries_the_last_value_forward_and_refuses_no_curves():
    out = pad_curves([[1.0, 2.0], [3.0], []])
    np.testing.assert_array_equal(out[:2], [[1.0, 2.0], [3.0, 3.0]])
    assert np.isnan(out[2]).all()
    with pytest.raises(ValueError, match="pad_curves needs at least one curve, got none"):
        pad_curves([])


def test_image_grid_refuses_no_panels():
    for rows in ([], [[]]):
        with pytest.raises(ValueError, match=r"image_grid needs at least one panel, got none \(e.g. a notebook "
                                             r"asked for 0 examples\)"):
            image_grid(rows)


def test_fmt_mean_std_uses_the_sample_spread_and_skips_missing_values():
    from gmmseg_core.plots import fmt_mean_std

    assert fmt_mean_std([0.61, 0.63]) == "62.0 ± 1.4"
    assert fmt_mean_std([0.5, float("nan"), None]) == "50.0"
    assert fmt_mean_std([float("nan")]) == "n/a"


def test_tables_write_markdown_and_the_raw_csv(tmp_path):
    import csv

    from gmmseg_core.plots import markdown_table, write_table

    rows = [{"model": "gmm", "miou": 0.51234, "ap": float("nan")}, {"model": "softmax", "miou": None}]
    assert markdown_table(rows, ["model", "miou", "ap"]).splitlines()[2:] == ["| gmm | 0.512 | n/a |",
                                                                               "| softmax |  |  |"]
    md, csv_path = write_table(rows, ["model", "miou"], tmp_path, "t", title="T", notes="note",
                               csv_rows=[{"model": "gmm", "miou": 0.51234, "seed": 0}],
                               csv_columns=["model", "seed", "miou"])
    assert md.read_text().startswith("# T\n\n| model | miou |") and md.read_text().endswith("\nnote\n")
    with open(csv_path) as f:
        assert list(csv.reader(f)) == [["model", "seed", "miou"], ["gmm", "0", "0.51234"]]


def test_training_curves_smooth_with_a_trailing_mean_at_the_right_steps():
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import training_curves

    fig, ax = plt.subplots()
    rows = [{"step": s, "loss": v} for s, v in zip(range(1, 6), [5.0, 3.0, 1.0, 3.0, ""])]
    training_curves(ax, {"run": rows}, "loss", smooth=2)
    line = ax.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(line.get_ydata(), [4.0, 2.0, 2.0])
    plt.close(fig)


def test_colorize_paints_ignored_pixels_black_whatever_the_palette_size():
    from gmmseg_core.plots import colorize

    palette = np.full((256, 3), 255)
    out = colorize(np.array([[0, 255], [-1, 3]]), palette)
    np.testing.assert_array_equal(out[..., 0], [[1.0, 0.0], [0.0, 1.0]])


def test_savefig_refuses_a_name_that_is_not_a_bare_stem(tmp_path):
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import savefig

    fig = plt.figure()
    for name in ("", "sub/fig", "fig.png"):
        with pytest.raises(ValueError, match="name must be a bare file stem"):
            savefig(fig, tmp_path, name)
    assert savefig(fig, tmp_path, "fig") == tmp_path / "fig.png" and (tmp_path / "fig.png").exists()
    plt.close(fig)


def _tick_boxes(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in ax.get_xticklabels()]


@pytest.mark.parametrize("n_classes, fig_width", [(19, 11), (150, 24)])
def test_grouped_bars_class_names_do_not_overlap(n_classes, fig_width):
    import matplotlib.pyplot as plt

    from gmmseg_core.data.classnames import ADE20K_CLASSES, CITYSCAPES_CLASSES
    from gmmseg_core.plots import grouped_bars

    classes = (CITYSCAPES_CLASSES if n_classes == 19 else ADE20K_CLASSES)[:n_classes]
    fig, ax = plt.subplots(figsize=(fig_width, 3.2))
    values = np.linspace(0, 50, n_classes)
    grouped_bars(ax, classes, {"softmax": (values, 0 * values), "gmm_paper": (values, 0 * values)})
    fig.tight_layout()
    boxes = _tick_boxes(fig, ax)
    plt.close(fig)
    overlaps = [(a, b) for a, b, left, right in zip(classes, classes[1:], boxes, boxes[1:]) if left.x1 > right.x0]
    assert not overlaps, f"overlapping class names: {overlaps[:3]}"


def test_grouped_bars_labels_that_fit_stay_horizontal():
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import grouped_bars

    fig, ax = plt.subplots(figsize=(11, 3.2))
    names = ["road", "sidewalk", "building", "vegetation", "sky", "vehicle", "person", "pole"]
    grouped_bars(ax, names, {"softmax": (np.ones(8), np.zeros(8))})
    assert {t.get_rotation() for t in ax.get_xticklabels()} == {0.0}
    plt.close(fig)
