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


def test_density_contours_paints_points_in_their_class_colours():
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import density_contours

    xx, yy = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
    X, y = np.array([[0.0, 0.0], [0.5, 0.5], [-0.5, 0.5]]), np.array([2, 0, 1])
    colors = ["#d62728", "#7f7f7f", "#1f77b4"]
    fig, ax = plt.subplots()
    density_contours(ax, xx, yy, -(xx**2 + yy**2), X, y, colors=colors)
    (points,) = ax.collections[-1:]
    plt.close(fig)
    np.testing.assert_allclose(points.get_facecolors()[:, :3], [mcolors.to_rgb(colors[c]) for c in y])


def test_roc_pr_legend_names_both_areas_and_covers_no_curve():
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import roc_pr_axes

    t = np.linspace(0, 1, 50)
    inverted = dict(fpr=t, tpr=t**3, recall=t, precision=0.1 + 0 * t, auroc=0.25, ap=0.06, ls="--")
    axes = roc_pr_axes({"density": inverted, "msp": dict(inverted, tpr=t**0.5, auroc=0.66, ap=0.08)})
    fig = axes[0].figure
    fig.canvas.draw()
    (legend,) = [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    box = legend.get_window_extent()
    plt.close(fig)
    assert [t.get_text() for t in legend.get_texts()] == ["density (0.250 / 0.060)", "msp (0.660 / 0.080)"]
    assert not any(box.overlaps(ax.get_window_extent()) for ax in axes)


def test_class_legend_has_one_swatch_per_class_in_its_palette_colour():
    import matplotlib.pyplot as plt

    from gmmseg_core.plots import class_legend

    fig, ax = plt.subplots()
    palette = np.array([[128, 64, 128], [70, 130, 180], [0, 0, 142]])
    legend = class_legend(fig, ["road", "sky", "vehicle"], palette)
    assert [t.get_text() for t in legend.get_texts()] == ["road", "sky", "vehicle"]
    np.testing.assert_allclose([h.get_facecolor()[:3] for h in legend.legend_handles], palette / 255.0)
    with pytest.raises(ValueError, match="palette has 3 colours for 4 classes"):
        class_legend(fig, ["road", "sky", "vehicle", "person"], palette)
    plt.close(fig)


# Machado et al. (2009) full-severity simulation matrices, applied in linear RGB: the two red-green deficiencies
# (about 8% of men) and blue-yellow tritanopia (about 1 in 10,000)
COLOUR_BLINDNESS = {
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.01182, 0.04294, 0.968881]],
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.3039]],
}


def _seen_gap(colour_a, colour_b, kind):
    """sRGB distance (0 to sqrt 3) between two matplotlib colours as seen with colour blindness ``kind``."""
    import matplotlib.colors as mcolors

    def seen(colour):
        c = np.asarray(mcolors.to_rgb(colour))
        linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        out = np.clip(np.asarray(COLOUR_BLINDNESS[kind]) @ linear, 0, 1)
        return np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)

    return float(np.linalg.norm(seen(colour_a) - seen(colour_b)))


def test_head_colours_stay_apart_for_red_green_colour_blind_readers():
    import itertools

    from gmmseg_core.plots import HEAD_COLORS

    heads = {k: HEAD_COLORS[k] for k in ("softmax", "gmm_paper", "gmm_official")}
    for (a, ca), (b, cb) in itertools.combinations(heads.items(), 2):
        for kind in ("deuteranopia", "protanopia"):  # the two GMM heads' lines differ in style for tritanopes
            gap = _seen_gap(ca, cb, kind)
            assert gap > 0.25, f"{a} and {b} look alike under {kind} (RGB distance {gap:.3f})"


def test_softmax_msp_and_gmm_density_colours_stay_apart_for_colour_blind_readers():
    from gmmseg_core.plots import SCORE_COLORS

    msp = SCORE_COLORS["softmax", "msp"]
    for model in ("gmm_paper", "gmm_official"):
        for kind in COLOUR_BLINDNESS:
            gap = _seen_gap(msp, SCORE_COLORS[model, "gmm"], kind)
            assert gap > 0.25, f"softmax msp and {model} gmm look alike under {kind} (RGB distance {gap:.3f})"


def test_score_colours_are_distinct_shades_of_their_heads_colour():
    import itertools

    import matplotlib.colors as mcolors

    from gmmseg_core.plots import HEAD_COLORS, SCORE_COLORS

    assert len(set(SCORE_COLORS.values())) == len(SCORE_COLORS)
    for (model_a, score_a), (model_b, score_b) in itertools.combinations(SCORE_COLORS, 2):
        gap = np.linalg.norm(np.subtract(mcolors.to_rgb(SCORE_COLORS[model_a, score_a]),
                                         mcolors.to_rgb(SCORE_COLORS[model_b, score_b])))
        assert gap > 0.25, f"{model_a} {score_a} and {model_b} {score_b} look alike (RGB distance {gap:.3f})"
    for (model, score), colour in SCORE_COLORS.items():
        hue = mcolors.rgb_to_hsv(mcolors.to_rgb(colour))[0]
        head_hue = mcolors.rgb_to_hsv(mcolors.to_rgb(HEAD_COLORS[model]))[0]
        turn = abs(hue - head_hue)
        assert min(turn, 1 - turn) < 0.1, f"{model} {score}: {colour} is not a shade of {HEAD_COLORS[model]}"
