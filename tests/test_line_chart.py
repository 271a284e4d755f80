"""Line charts: axis mapping, point positions, log axis, NaN handling, errors, legend/title ink, side-by-side, PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distill_mixins.eval.chart import MARK, Series, chart_layout, format_tick, line_chart, line_charts, to_pixel
from distill_mixins.eval.images import write_png
from distill_mixins.eval.visual import INK, LINE, PAD

RED, BLUE = (255, 0, 0), (0, 0, 255)
LABELS = {"title": "FID vs steps", "x_label": "steps", "y_label": "FID"}


def is_color(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels exactly ``color``."""
    return (image == np.array(color, dtype=np.uint8)).all(axis=-1)


def test_to_pixel_known_answers():
    assert to_pixel(0.0, 0.0, 10.0, 240) == 0
    assert to_pixel(10.0, 0.0, 10.0, 240) == 239
    assert to_pixel(5.0, 0.0, 10.0, 240) == math.floor(239 / 2 + 0.5) == 120
    assert to_pixel(5.0, 0.0, 10.0, 241) == 120
    assert to_pixel(-2.0, 0.0, 10.0, 11) == -2  # outside the range lands outside the axis
    assert [to_pixel(v, 1.0, 100.0, 201, log=True) for v in (1.0, 10.0, 100.0)] == [0, 100, 200]


def test_format_tick_is_compact():
    cases = {0.0: "0", 36.0: "36", 0.25: "0.25", 0.123456: "0.1235", 1.5e-3: "1.5E-3", 1234567.0: "1.23E6",
             -0.0424: "-0.042", 0.30000000004: "0.3", -1.5e-3: "-2E-3"}
    assert {v: format_tick(v) for v in cases} == cases
    assert all(len(format_tick(v)) <= 6 for v in np.geomspace(1e-12, 1e12, 97) * np.array([1, -1] * 48 + [1]))


def test_points_are_drawn_at_their_layout_pixels():
    series = [Series("a", [0.0, 10.0], [1.0, 3.0], RED)]
    image = line_chart(series, **LABELS)
    lay = chart_layout(series, **LABELS)
    assert image.shape == (lay.height, lay.width, 3) and image.dtype == np.uint8
    assert is_color(image, RED).any()
    for x, y in [(0.0, 1.0), (10.0, 3.0)]:
        row, col = lay.pixel(x, y)
        assert lay.top <= row < lay.top + lay.plot_h and lay.left <= col < lay.left + lay.plot_w
        assert is_color(image[row - MARK : row + MARK + 1, col - MARK : col + MARK + 1], RED).all()
    far = lay.pixel(0.0, 3.0)  # top-left corner of the data, away from the rising line
    assert not is_color(image[far[0] - 3 : far[0] + 4, far[1] - 3 : far[1] + 4], RED).any()
    assert lay.pixel(0.0, 1.0)[0] > lay.pixel(10.0, 3.0)[0]  # larger y is higher up


def test_increasing_series_rises_left_to_right():
    series = [Series("up", np.arange(20.0), np.arange(20.0) ** 1.5, RED, marker=False)]
    image = line_chart(series, **LABELS)
    lay = chart_layout(series, **LABELS)
    red = is_color(image, RED)[lay.top : lay.top + lay.plot_h, lay.left : lay.left + lay.plot_w]
    third = lay.plot_w // 3
    rows_left, _ = np.nonzero(red[:, :third])
    rows_right, _ = np.nonzero(red[:, -third:])
    assert rows_left.size and rows_right.size
    assert rows_left.mean() > rows_right.mean() + lay.plot_h / 3
    assert not is_color(image, RED)[: lay.top].any() and not is_color(image, RED)[lay.top + lay.plot_h :].any()


def test_log_x_spaces_decades_equally():
    series = [Series("flat", [1.0, 10.0, 100.0], [2.0, 2.0, 2.0], RED)]
    image = line_chart(series, **LABELS, log_x=True)
    lay = chart_layout(series, **LABELS, log_x=True)
    row = lay.row(2.0)
    # Markers reach MARK rows above the 2 px line: their columns are three runs of 2 * MARK + 1.
    cols = np.nonzero(is_color(image[row - MARK], RED))[0]
    runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
    assert [len(r) for r in runs] == [2 * MARK + 1] * 3
    centres = [r.mean() for r in runs]
    assert abs((centres[1] - centres[0]) - (centres[2] - centres[1])) <= 1
    assert centres == [lay.col(x) for x in (1.0, 10.0, 100.0)]
    assert lay.x_ticks == (1.0, 10.0, 100.0)


def test_nan_points_are_dropped_and_all_nan_raises():
    ticks = [0.0, 1.0, 2.0, 3.0]  # fixes the x range, so both charts share the layout
    with_nan = line_chart([Series("a", ticks, [1.0, np.nan, 3.0, np.inf], RED)], **LABELS, x_ticks=ticks)
    without = line_chart([Series("a", [0.0, 2.0], [1.0, 3.0], RED)], **LABELS, x_ticks=ticks)
    np.testing.assert_array_equal(with_nan, without)
    with pytest.raises(ValueError, match="every y value is NaN"):
        line_chart([Series("a", [1.0, 2.0], [np.nan, np.nan], RED), Series("b", [1.0], [np.inf], BLUE)], **LABELS)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: line_chart([], **LABELS), "series is empty"),
        (lambda: Series("a", [1.0, 2.0], [1.0], RED), "x and y"),
        (lambda: Series("a", [], [], RED), "x and y"),
        (lambda: line_chart([Series("a", [0.0, 1.0], [1.0, 2.0], RED)], **LABELS, log_x=True), "log_x"),
        (lambda: Series("a", [1.0, np.nan], [1.0, 2.0], RED), "x has non-finite"),
        (lambda: Series("a", [1.0], [1.0], (256, 0, 0)), "color"),
        (lambda: Series("a", [1.0], [1.0], (1, 2)), "color"),
        (lambda: line_chart([Series("a", [1.0], [1.0], RED)], **LABELS, size=(0, 100)), "size"),
        (lambda: line_chart([Series("a", [1.0], [1.0], RED)], **LABELS, x_ticks=[np.inf]), "x_ticks"),
    ],
)
def test_invalid_arguments_raise_naming_them(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_legend_and_title_are_drawn():
    def chart(label: str, title: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        series = [Series(label, [1.0, 2.0], [1.0, 2.0], RED)]
        labels = {**LABELS, "title": title}
        image, lay = line_chart(series, **labels), chart_layout(series, **labels)
        ink = is_color(image, INK)
        return ink[lay.top : lay.top + lay.plot_h, lay.left + lay.plot_w + 1 :], ink[: PAD + LINE], image

    legend, title, image = chart("student", "FID")
    assert legend.any() and title.any()
    assert is_color(image, RED).sum() > 0
    legend, title, _ = chart("", "")
    assert not legend.any() and not title.any()


def test_line_charts_side_by_side():
    a = line_chart([Series("a", [1.0, 2.0], [1.0, 2.0], RED)], **LABELS, size=(100, 120))
    b = line_chart([Series("b", [1.0, 2.0], [2.0, 1.0], BLUE)], **LABELS, size=(40, 60))
    assert a.shape[0] > b.shape[0]
    out = line_charts([a, b], gap=7)
    assert out.shape == (a.shape[0], a.shape[1] + 7 + b.shape[1], 3)
    np.testing.assert_array_equal(out[:, : a.shape[1]], a)
    np.testing.assert_array_equal(out[: b.shape[0], a.shape[1] + 7 :], b)
    assert (out[b.shape[0] :, a.shape[1] :] == 255).all() and (out[:, a.shape[1] : a.shape[1] + 7] == 255).all()


def test_chart_writes_png(tmp_path):
    path = tmp_path / "chart.png"
    write_png(path, line_chart([Series("a", [1.0, 2.0, 4.0], [3.0, 2.0, 1.5], RED)], **LABELS, log_x=True))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
