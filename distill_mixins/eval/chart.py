"""Dependency-free line charts (eval curves such as FID vs. sampling steps) as (H, W, 3) uint8 images, numpy only.

A chart is a plot area of ``size`` = (plot_h, plot_w) pixels framed by margins: the title and the y-axis label
above it, tick labels left of and below it, the x-axis label under those, the legend to its right.
:func:`chart_layout` gives that geometry; ``chart_layout(...).pixel(x, y)`` is the (row, col) where a data point
is drawn. Text uses the 5x7 bitmap font of :mod:`distill_mixins.eval.visual` (tick labels at half size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distill_mixins.eval.visual import FONT_SCALE, LINE, PAD, _draw_text, text_width

AXIS, GRID = (90, 90, 90), (225, 225, 225)
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))
"""Distinct series colours, for callers that need defaults."""
TICK_SCALE, TICK_LEN, MARK, SWATCH, THICK = 1, 4, 2, 16, 2
"""Tick label font scale, tick mark length, marker half-size, legend swatch width, line thickness (pixels)."""


@dataclass(frozen=True)
class Series:
    """One line: ``label`` (legend text), points ``x`` and ``y`` (same length >= 1, finite x; NaN/inf y points
    are dropped and the line joins their neighbours), RGB ``color`` (3 ints 0-255), ``marker``: a filled
    (2 * MARK + 1)-pixel square at each point."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int]
    marker: bool = True

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x, dtype=float), np.asarray(self.y, dtype=float)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError(f"Series {self.label!r}: x and y must be 1-D of one length >= 1, got shapes "
                             f"{x.shape} and {y.shape}; pass one y per x.")
        if not np.isfinite(x).all():
            raise ValueError(f"Series {self.label!r}: x has non-finite values {x[~np.isfinite(x)].tolist()}; "
                             "drop those points.")
        if len(self.color) != 3 or any(int(c) != c or not 0 <= c <= 255 for c in self.color):
            raise ValueError(f"Series {self.label!r}: color={tuple(self.color)} must be 3 integers in 0-255, "
                             "e.g. (214, 39, 40).")

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) float arrays (N,) of the points with finite y."""
        x, y = np.asarray(self.x, dtype=float), np.asarray(self.y, dtype=float)
        keep = np.isfinite(y)
        return x[keep], y[keep]


def to_pixel(value: float, lo: float, hi: float, length: int, log: bool = False) -> int:
    """Pixel of ``value`` on an axis of ``length`` pixels: lo -> 0, hi -> length - 1, rounded half up (log10
    scale when ``log``; values outside [lo, hi] land outside [0, length))."""
    f = math.log10 if log else float
    t = (f(value) - f(lo)) / (f(hi) - f(lo))
    return math.floor(t * (length - 1) + 0.5)


def format_tick(value: float) -> str:
    """Label of at most 6 characters: fixed point for 0.01 <= |value| < 1e5 ('36', '0.25', '-0.042', '0.1235'),
    else scientific ('1.5E-3', '1.23E6')."""
    if value == 0:
        return "0"
    fixed = [f"{value:.{p}f}" for p in range(4, -1, -1)] if 1e-2 <= abs(value) < 1e5 else []
    sci = [f"{m.rstrip('0').rstrip('.') if '.' in m else m}E{int(e)}"
           for m, e in (f"{value:.{p}E}".split("E") for p in range(3, -1, -1))]
    labels = [s.rstrip("0").rstrip(".") if "." in s else s for s in fixed] + sci
    return next((s for s in labels if len(s) <= 6), labels[-1])


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened by 5% of its span each side; a flat one by 5% of |lo|, or 1 when lo = 0."""
    d = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(lo) or 1.0
    return lo - d, hi + d


@dataclass(frozen=True)
class ChartLayout:
    """Chart geometry: the plot area is rows [top, top + plot_h) and columns [left, left + plot_w) of an image
    (height, width); ``x_range``/``y_range`` are the data values at its edges."""

    top: int
    left: int
    plot_h: int
    plot_w: int
    height: int
    width: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_x: bool
    x_ticks: tuple[float, ...]
    y_ticks: tuple[float, ...]

    def col(self, x: float) -> int:
        """Image column of data value x."""
        return self.left + to_pixel(x, *self.x_range, self.plot_w, self.log_x)

    def row(self, y: float) -> int:
        """Image row of data value y (larger y is higher up)."""
        return self.top + self.plot_h - 1 - to_pixel(y, *self.y_range, self.plot_h)

    def pixel(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the data point (x, y): the centre of its marker."""
        return self.row(y), self.col(x)


def _x_axis(series: Sequence[Series], log_x: bool, x_ticks: Sequence[float] | None) -> tuple[tuple, tuple]:
    """(x_range, x_ticks) in data units; ranges pad 5% on the (log10 when ``log_x``) axis."""
    f, inv = (np.log10, lambda v: 10.0**v) if log_x else (np.asarray, lambda v: v)
    xs = np.unique(np.concatenate([np.asarray(s.x, dtype=float) for s in series]))
    if x_ticks is None:
        ticks = xs if xs.size <= 8 else inv(np.linspace(f(xs[0]), f(xs[-1]), 5))
    else:
        ticks = np.asarray(x_ticks, dtype=float).reshape(-1)
        if not np.isfinite(ticks).all() or (log_x and (ticks <= 0).any()):
            raise ValueError(f"x_ticks={list(x_ticks)} must be finite (and > 0 with log_x=True).")
    lo, hi = _padded(float(f(min(xs[0], ticks.min(initial=xs[0])))), float(f(max(xs[-1], ticks.max(initial=xs[-1])))))
    return (float(inv(lo)), float(inv(hi))), tuple(float(t) for t in ticks)


def _y_axis(series: Sequence[Series]) -> tuple[tuple[float, float], tuple[float, ...]]:
    """(y_range, 5 y_ticks spanning it): the finite y values padded by 5%."""
    ys = np.concatenate([s.points()[1] for s in series])
    if ys.size == 0:
        raise ValueError("series: every y value is NaN or inf, nothing to draw; pass at least one finite y.")
    lo, hi = _padded(float(ys.min()), float(ys.max()))
    return (lo, hi), tuple(0.0 if abs(v) < 1e-9 * (hi - lo) else float(v) for v in np.linspace(lo, hi, 5))


def chart_layout(
    series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
    size: tuple[int, int] = (240, 360), x_ticks: Sequence[float] | None = None,
) -> ChartLayout:
    """Validated geometry of ``line_chart`` with the same arguments (see there)."""
    if not series:
        raise ValueError("series is empty: pass at least one Series(label, x, y, color).")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size={tuple(size)} must be (plot height, plot width) in pixels, each >= 16.")
    if log_x and any(min(s.x) <= 0 for s in series):
        raise ValueError("log_x=True needs every x > 0; drop the points with x <= 0 or pass log_x=False.")
    (x_range, xt), (y_range, yt) = _x_axis(series, log_x, x_ticks), _y_axis(series)
    plot_h, plot_w = int(size[0]), int(size[1])
    top = PAD + 2 * LINE + 4
    x_tick_w = max([text_width(format_tick(v), TICK_SCALE) for v in xt] + [0])
    left = PAD + max(max(text_width(format_tick(v), TICK_SCALE) for v in yt) + TICK_LEN + 3, x_tick_w // 2 + 1)
    legend_w = 3 * PAD + SWATCH + 4 + max(text_width(s.label) for s in series)
    width = max(left + plot_w + max(legend_w, x_tick_w // 2 + PAD), 2 * PAD + text_width(title),
                2 * PAD + text_width(y_label), left + text_width(x_label) + PAD)
    height = max(top + plot_h + TICK_LEN + 2 + 7 * TICK_SCALE + 4 + LINE + PAD, top + len(series) * LINE + PAD)
    return ChartLayout(top, left, plot_h, plot_w, height, width, x_range, y_range, log_x, xt, yt)


def _paint(canvas: np.ndarray, rows: np.ndarray, cols: np.ndarray, color: tuple, box: tuple[int, ...]) -> None:
    """Set pixels (rows, cols) to ``color``, keeping those inside ``box`` = (row0, row1, col0, col1)."""
    r0, r1, c0, c1 = box
    keep = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
    canvas[rows[keep], cols[keep]] = color


def _brush(rows: np.ndarray, cols: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N,) stamped with a square brush of ``offsets`` -> (N * K * K,) rows and cols."""
    r, c = np.broadcast_arrays(rows[:, None, None] + offsets[:, None], cols[:, None, None] + offsets[None, :])
    return r.ravel(), c.ravel()


def _polyline(rows: Sequence[int], cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the segments joining consecutive points (DDA, one sample per pixel step), THICK px wide."""
    rs, cs = [np.asarray(rows, dtype=int)], [np.asarray(cols, dtype=int)]
    for ra, ca, rb, cb in zip(rows[:-1], cols[:-1], rows[1:], cols[1:], strict=True):
        t = np.linspace(0.0, 1.0, max(abs(rb - ra), abs(cb - ca)) + 1)
        rs.append(np.floor(ra + t * (rb - ra) + 0.5).astype(int))
        cs.append(np.floor(ca + t * (cb - ca) + 0.5).astype(int))
    return _brush(np.concatenate(rs), np.concatenate(cs), np.arange(THICK))


def _draw_series(canvas: np.ndarray, s: Series, rows: list[int], cols: list[int], box: tuple[int, ...],
                 marks: tuple[list[int], list[int]] | None = None) -> None:
    """Line of one series through pixel points (rows, cols) and markers at ``marks`` (default: the points)."""
    _paint(canvas, *_polyline(rows, cols), s.color, box)
    if s.marker:
        mr, mc = marks or (rows, cols)
        _paint(canvas, *_brush(np.asarray(mr), np.asarray(mc), np.arange(-MARK, MARK + 1)), s.color, box)


def _draw_legend(canvas: np.ndarray, series: Sequence[Series], lay: ChartLayout) -> None:
    """One line per series right of the plot area: a swatch of its line (and marker), then its label."""
    x, full = lay.left + lay.plot_w + 2 * PAD, (0, lay.height, 0, lay.width)
    for i, s in enumerate(series):
        y = lay.top + i * LINE
        mid = y + 7 * FONT_SCALE // 2
        _draw_series(canvas, s, [mid, mid], [x, x + SWATCH - 1], full, marks=([mid], [x + SWATCH // 2]))
        _draw_text(canvas, y, x + SWATCH + 4, s.label)


def _draw_axes(canvas: np.ndarray, lay: ChartLayout) -> None:
    """Gridlines, axis lines outside the plot area, tick marks and tick labels."""
    top, left, bottom, right = lay.top, lay.left, lay.top + lay.plot_h, lay.left + lay.plot_w
    half = 7 * TICK_SCALE // 2
    for v in lay.x_ticks:
        c = lay.col(v)
        canvas[top:bottom, c] = GRID
        canvas[bottom + 1 : bottom + 1 + TICK_LEN, c] = AXIS
        text = format_tick(v)
        _draw_text(canvas, bottom + TICK_LEN + 2, c - text_width(text, TICK_SCALE) // 2, text, scale=TICK_SCALE)
    for v in lay.y_ticks:
        r = lay.row(v)
        canvas[r, left:right] = GRID
        canvas[r, left - 1 - TICK_LEN : left - 1] = AXIS
        text = format_tick(v)
        _draw_text(canvas, r - half, left - TICK_LEN - 3 - text_width(text, TICK_SCALE), text, scale=TICK_SCALE)
    canvas[top : bottom + 1, left - 1] = AXIS
    canvas[bottom, left - 1 : right] = AXIS


def line_chart(
    series: Sequence[Series], *, title: str, x_label: str, y_label: str, log_x: bool = False,
    size: tuple[int, int] = (240, 360), x_ticks: Sequence[float] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 RGB chart on white: axes with tick labels, lines between consecutive points of each series,
    markers, a legend (right), a title (top left); the y-axis label sits above the plot, the x-axis label below.

    size = (plot-area height, plot-area width) in pixels; the image adds margins (:func:`chart_layout`).
    log_x: log10 x axis (x must be > 0). x_ticks: tick positions on x (default: the union of the series' x values
    when there are at most 8, else 5 evenly spaced). y axis: 5 ticks spanning [min, max] of the finite y values
    padded by 5% (a flat series gets +-5% of its value, or +-1 at 0); the x range also pads by 5%.
    """
    lay = chart_layout(series, title=title, x_label=x_label, y_label=y_label, log_x=log_x, size=size,
                       x_ticks=x_ticks)
    canvas = np.full((lay.height, lay.width, 3), 255, dtype=np.uint8)
    _draw_axes(canvas, lay)
    box = (lay.top, lay.top + lay.plot_h, lay.left, lay.left + lay.plot_w)
    for s in series:
        x, y = s.points()
        _draw_series(canvas, s, [lay.row(v) for v in y], [lay.col(v) for v in x], box)
    _draw_legend(canvas, series, lay)
    _draw_text(canvas, PAD, PAD, title)
    _draw_text(canvas, PAD + LINE, PAD, y_label)
    x_text_y = lay.top + lay.plot_h + TICK_LEN + 2 + 7 * TICK_SCALE + 4
    _draw_text(canvas, x_text_y, lay.left + max(0, (lay.plot_w - text_width(x_label)) // 2), x_label)
    return canvas


def line_charts(panels: Sequence[np.ndarray], gap: int = 12) -> np.ndarray:
    """Charts (H_i, W_i, 3) uint8 side by side on white, top-aligned: (max H_i, sum W_i + gap * (n - 1), 3)."""
    if not panels or any(p.ndim != 3 or p.shape[2] != 3 for p in panels) or gap < 0:
        raise ValueError(f"line_charts needs panels (H, W, 3) (got {[p.shape for p in panels]}) and gap >= 0.")
    out = np.full((max(p.shape[0] for p in panels), sum(p.shape[1] for p in panels) + gap * (len(panels) - 1), 3),
                  255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out
