"""Training visual: a PNG grid of first/middle/last frames and a looping GIF of full clips, dependency-free.

Rows are named clips (B, C, T, H, W), drawn in mapping order, e.g. ``{"student 1-step": x, "teacher 1-step": y,
"condition": c, "ground truth": g}``; a ``None`` row is skipped. Values map linearly from ``value_range`` to
[0, 255] (rounded half up, clipped); a pixel with any non-finite channel (NaN or inf) is drawn magenta, with a
warning. Channels: C = 3 is RGB and C = 1 grey; ``channels="first3"`` shows the first three channels when C > 3,
``channels="mean"`` shows the channel mean as grey (always used for C = 2). Latent rows go through ``decode``
((B, C, T, H, W) -> (B, 3, T, H', W')) first. Frame names: ``first`` = 0, ``middle`` = (T - 1) // 2 (3 for T = 8),
``last`` = T - 1; an int picks that frame (negative counts from the end). Frames are upscaled by the integer
nearest-neighbour factor ``ceil(min_size / min(H, W))`` (32x32 -> 64x64 by default).
"""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill_mixins.config import check_choice, check_positive
from distill_mixins.eval.images import write_png

Decoder = Callable[[Tensor], Tensor]
"""Latent clip (B, C, T, H, W) -> RGB clip (B, 3, T', H', W') in ``value_range``."""
FrameSpec = str | int
FRAME_NAMES = ("first", "middle", "last")
CHANNEL_MODES = ("first3", "mean")
BACKGROUND, INK, MAGENTA = (255, 255, 255), (0, 0, 0), (255, 0, 255)
PAD, GAP, BLOCK_GAP = 4, 2, 10
"""Outer padding, gap between cells of one sample, gap between samples (pixels)."""
FONT_SCALE = 2
CHAR_H, LINE = 7 * FONT_SCALE, 7 * FONT_SCALE + 4

# 5x7 glyphs: seven rows of five bits (bit 4 = leftmost column) as hex bytes; lower case draws as upper case.
_FONT_HEX = {
    "A": "0e11111f111111", "B": "1e11111e11111e", "C": "0e11101010110e", "D": "1e11111111111e",
    "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f", "H": "1111111f111111",
    "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211", "L": "1010101010101f",
    "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e", "P": "1e11111e101010",
    "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e", "T": "1f040404040404",
    "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a", "X": "11110a040a1111",
    "Y": "11110a04040404", "Z": "1f01020408101f", "0": "0e11131519110e", "1": "040c040404040e",
    "2": "0e11010204081f", "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e",
    "6": "0608101e11110e", "7": "1f010204080808", "8": "0e11110e11110e", "9": "0e11110f01020c",
    " ": "00000000000000", "-": "0000001f000000", "/": "01010204081010", ".": "00000000000c0c",
    ":": "000c0c000c0c00", "_": "0000000000001f", "(": "02040808080402", ")": "08040202020408",
    "=": "00001f001f0000", "+": "0004041f040400", "?": "0e110102040004",
}
_GLYPHS = {
    ch: np.array([[(row >> (4 - i)) & 1 for i in range(5)] for row in bytes.fromhex(code)], dtype=bool)
    for ch, code in _FONT_HEX.items()
}


@dataclass(frozen=True)
class VisualPaths:
    """Files written by :func:`write_training_visual` (``gif`` is None when no animation was asked for)."""

    png: Path
    gif: Path | None


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a visual: the cell of (sample, row, column) is (cell_h, cell_w) at ``origin``."""

    num_samples: int
    num_rows: int
    num_cols: int
    cell_h: int
    cell_w: int
    margin: int
    """Width of the left label margin: x of the first cell."""
    top: int
    """Height of the two header lines: y of the first cell."""

    @property
    def block_w(self) -> int:
        """Width of one sample's block of columns."""
        return self.num_cols * self.cell_w + (self.num_cols - 1) * GAP

    @property
    def height(self) -> int:
        """Image height: header, rows of cells with gaps, bottom padding."""
        return self.top + self.num_rows * self.cell_h + (self.num_rows - 1) * GAP + PAD

    @property
    def width(self) -> int:
        """Image width: margin, sample blocks with gaps, right padding."""
        return self.margin + self.num_samples * self.block_w + (self.num_samples - 1) * BLOCK_GAP + PAD

    def origin(self, sample: int, row: int, col: int) -> tuple[int, int]:
        """Top-left (y, x) of a cell."""
        y = self.top + row * (self.cell_h + GAP)
        return y, self.margin + sample * (self.block_w + BLOCK_GAP) + col * (self.cell_w + GAP)


def text_width(text: str, scale: int = FONT_SCALE) -> int:
    """Pixel width of ``text`` in the built-in 5x7 font (advance 6 columns per character, times ``scale``)."""
    return max((6 * len(text) - 1) * scale, 0)


def grid_layout(
    num_samples: int, num_rows: int, num_cols: int, cell_hw: tuple[int, int], margin_texts: Sequence[str]
) -> GridLayout:
    """Layout with a left margin wide enough for every text in ``margin_texts`` and two header lines."""
    margin = PAD + max([text_width(t) for t in margin_texts] + [0]) + 2 * PAD
    return GridLayout(num_samples, num_rows, num_cols, cell_hw[0], cell_hw[1], margin, PAD + 2 * LINE)


def _fit_scale(texts: Sequence[str], max_width: int) -> int:
    """FONT_SCALE when every text fits ``max_width``, else 1 (half size), so that one header line has one size."""
    return FONT_SCALE if all(text_width(t) <= max_width for t in texts) else 1


def _draw_text(
    canvas: np.ndarray, y: int, x: int, text: str, max_width: int | None = None, scale: int = FONT_SCALE
) -> None:
    """Draw ``text`` (unknown characters as '?') at top-left (y, x); characters beyond ``max_width`` are dropped."""
    for i, ch in enumerate(text):
        x0 = x + 6 * i * scale
        if max_width is not None and x0 + 5 * scale > x + max_width:
            break
        glyph = _GLYPHS.get(ch.upper(), _GLYPHS["?"]).repeat(scale, 0).repeat(scale, 1)
        region = canvas[y : y + 7 * scale, x0 : x0 + 5 * scale]
        region[glyph[: region.shape[0], : region.shape[1]]] = INK


@dataclass(frozen=True)
class _Clips:
    """Rows ready to draw: names and (S, T, H, W, 3) uint8 videos of the chosen samples."""

    names: list[str]
    videos: list[np.ndarray]
    sample_ids: list[int]
    scale: int

    @property
    def num_frames(self) -> int:
        """T."""
        return self.videos[0].shape[1]

    @property
    def cell_hw(self) -> tuple[int, int]:
        """Upscaled frame size."""
        return self.videos[0].shape[2] * self.scale, self.videos[0].shape[3] * self.scale


@dataclass(frozen=True)
class _Header:
    """Texts of the two header lines: margin texts and titles per sample block and per cell column."""

    corner: str
    block_titles: list[str]
    corner2: str
    column_titles: list[list[str]]


def _named_rows(rows: Mapping[str, Tensor | None]) -> list[tuple[str, Tensor]]:
    """Non-None rows in order, each checked to be a 5-D tensor."""
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("rows must be a non-empty mapping of row name -> clip (B, C, T, H, W), e.g. "
                         "{'student 1-step': x, 'ground truth': x0}.")
    named = [(str(name), clip) for name, clip in rows.items() if clip is not None]
    if not named:
        raise ValueError(f"every row in {list(rows)} is None: pass at least one clip (B, C, T, H, W).")
    for name, clip in named:
        if not isinstance(clip, Tensor) or clip.ndim != 5:
            got = f"shape {tuple(clip.shape)}" if isinstance(clip, Tensor) else type(clip).__name__
            raise ValueError(f"row {name!r} must be a tensor (B, C, T, H, W), got {got}; add the missing "
                             "axes (e.g. clip[:, :, None] for a single frame).")
    return named


def _sample_ids(samples: int | Sequence[int], batch: int) -> list[int]:
    """Sample indices: the first ``samples`` (at most B) or the given indices, checked against B."""
    if isinstance(samples, int):
        if samples < 1:
            raise ValueError(f"samples={samples} must be >= 1 (how many samples to show) or a list of indices.")
        return list(range(min(samples, batch)))
    ids = [int(i) for i in samples]
    if not ids or any(not -batch <= i < batch for i in ids):
        raise ValueError(f"samples={list(samples)} must be non-empty indices in [0, {batch}) (the batch size).")
    return [i % batch for i in ids]


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    """(lo, hi) with finite lo < hi."""
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range={tuple(value_range)} must be finite (lo, hi) with lo < hi, e.g. (-1, 1).")
    return lo, hi


def _decoded(name: str, clip: Tensor, decode: Decoder | None) -> Tensor:
    """``decode(clip)`` (no grad) checked to keep the batch and be 5-D; ``clip`` itself without a decoder."""
    if decode is None:
        return clip
    with torch.no_grad():
        out = decode(clip)
    if not isinstance(out, Tensor) or out.ndim != 5 or out.shape[0] != clip.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"decode returned {got} for row {name!r} of shape {tuple(clip.shape)}; it must map "
                         "(B, C, T, H, W) to (B, 3, T', H', W').")
    return out


def _to_uint8(name: str, clip: Tensor, lo: float, hi: float, channels: str) -> np.ndarray:
    """(S, C, T, H, W) -> (S, T, H, W, 3) uint8: floor((x - lo) * 255 / (hi - lo) + 0.5) clipped; non-finite magenta."""
    x = clip.detach().to("cpu", torch.float32)
    if channels == "mean" or x.shape[1] == 2:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] > 3:
        x = x[:, :3]
    x = x.expand(-1, 3, -1, -1, -1) if x.shape[1] == 1 else x
    bad = ~torch.isfinite(x).all(dim=1)
    value = torch.floor((x - lo) * (255.0 / (hi - lo)) + 0.5).clamp(0, 255).nan_to_num(0.0)
    out = value.permute(0, 2, 3, 4, 1).to(torch.uint8).numpy().copy()
    if bad.any():
        warnings.warn(f"row {name!r} has {int(bad.sum())} pixels with non-finite values; drawn magenta.",
                      RuntimeWarning, stacklevel=4)
        out[bad.numpy()] = MAGENTA
    return out


def _prepare(
    rows: Mapping[str, Tensor | None], samples: int | Sequence[int], value_range: tuple[float, float],
    decode: Decoder | None, decode_rows: Sequence[str] | None, channels: str, min_size: int,
) -> _Clips:
    """Validate rows, pick samples, decode, and convert to uint8 videos (S, T, H, W, 3)."""
    check_choice("visual", "channels", channels, CHANNEL_MODES)
    check_positive("visual", "min_size", min_size)
    lo, hi = _check_value_range(value_range)
    named = _named_rows(rows)
    batches = {name: clip.shape[0] for name, clip in named}
    if len(set(batches.values())) > 1:
        raise ValueError(f"rows must share the batch size B, got {batches}; slice them to one batch.")
    unknown = sorted(set(decode_rows or ()) - set(rows))
    if unknown:
        raise ValueError(f"decode_rows names unknown rows {unknown}; rows are {list(rows)}.")
    decoded_names = set(rows) if decode_rows is None else set(decode_rows)
    ids = _sample_ids(samples, named[0][1].shape[0])
    clips = [(n, _decoded(n, c[ids], decode if n in decoded_names else None)) for n, c in named]
    sizes = {name: tuple(clip.shape[2:]) for name, clip in clips}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"rows must share T, H, W (after decode), got {sizes}; resize them, or pass decode= "
                         "and decode_rows= for latent rows.")
    videos = [_to_uint8(name, clip, lo, hi, channels) for name, clip in clips]
    h, w = videos[0].shape[2:4]
    return _Clips([n for n, _ in clips], videos, ids, max(1, math.ceil(min_size / min(h, w))))


def frame_index(spec: FrameSpec, num_frames: int) -> int:
    """Frame of ``spec``: first = 0, middle = (T - 1) // 2, last = T - 1, or an int index (negative from the end)."""
    if isinstance(spec, str):
        check_choice("sample_grid", "frames", spec, FRAME_NAMES)
        return {"first": 0, "middle": (num_frames - 1) // 2, "last": num_frames - 1}[spec]
    if not -num_frames <= int(spec) < num_frames:
        raise ValueError(f"frame index {spec} is out of range for T={num_frames} frames; use -T <= index < T.")
    return int(spec) % num_frames


def _draw(clips: _Clips, frames: Sequence[int], layout: GridLayout, header: _Header) -> np.ndarray:
    """Canvas (H, W, 3) uint8 with every row's frames per sample block, row labels and headers."""
    canvas = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    k = clips.scale
    for r, (name, video) in enumerate(zip(clips.names, clips.videos, strict=True)):
        _draw_text(canvas, layout.origin(0, r, 0)[0] + (layout.cell_h - CHAR_H) // 2, PAD, name)
        for s in range(layout.num_samples):
            for c, t in enumerate(frames):
                y, x = layout.origin(s, r, c)
                canvas[y : y + layout.cell_h, x : x + layout.cell_w] = video[s, t].repeat(k, 0).repeat(k, 1)
    _draw_text(canvas, PAD, PAD, header.corner)
    _draw_text(canvas, PAD + LINE, PAD, header.corner2)
    block_scale = _fit_scale(header.block_titles, layout.block_w)
    column_scale = _fit_scale([t for titles in header.column_titles for t in titles], layout.cell_w)
    for s in range(layout.num_samples):
        x = layout.origin(s, 0, 0)[1]
        _draw_text(canvas, PAD, x, header.block_titles[s], layout.block_w, block_scale)
        for c, title in enumerate(header.column_titles[s]):
            y = PAD + LINE + CHAR_H - 7 * column_scale  # bottom-aligned next to the cells
            _draw_text(canvas, y, layout.origin(s, 0, c)[1], title, layout.cell_w, column_scale)
    return canvas


def _grid(clips: _Clips, frames: Sequence[FrameSpec], title: str) -> np.ndarray:
    """Grid image of prepared clips (see :func:`sample_grid`)."""
    if isinstance(frames, str) or not frames:
        raise ValueError("frames must name at least one frame, e.g. ('first', 'middle', 'last').")
    index = [frame_index(f, clips.num_frames) for f in frames]
    titles = [f if isinstance(f, str) else f"t={i}" for f, i in zip(frames, index, strict=True)]
    layout = grid_layout(len(clips.sample_ids), len(clips.names), len(index), clips.cell_hw, [*clips.names, title])
    header = _Header(title, [f"sample {i}" for i in clips.sample_ids], "", [titles] * len(clips.sample_ids))
    return _draw(clips, index, layout, header)


def _animation(clips: _Clips) -> list[np.ndarray]:
    """Animation frames of prepared clips (see :func:`clip_animation`)."""
    num = clips.num_frames
    corner = [f"frame {t + 1}/{num}" for t in range(num)]
    layout = grid_layout(len(clips.sample_ids), len(clips.names), 1, clips.cell_hw, [*clips.names, corner[-1]])
    blocks = [""] * len(clips.sample_ids)
    columns = [[str(i)] for i in clips.sample_ids]
    return [_draw(clips, [t], layout, _Header(corner[t], blocks, "sample", columns)) for t in range(num)]


def sample_grid(
    rows: Mapping[str, Tensor | None], *, samples: int | Sequence[int] = 4,
    frames: Sequence[FrameSpec] = FRAME_NAMES, value_range: tuple[float, float] = (-1.0, 1.0),
    decode: Decoder | None = None, decode_rows: Sequence[str] | None = None, channels: str = "first3",
    min_size: int = 64, title: str = "",
) -> np.ndarray:
    """Grid image (H, W, 3) uint8: per sample a block of rows x frames (first, middle, last), labelled.

    Rows top to bottom in mapping order with their names in the left margin; samples left to right, each
    headed "sample i" and its columns by frame name (``t=i`` for int frames); ``title`` goes top left.
    ``decode`` applies to ``decode_rows`` (all rows when None). See the module docstring for value mapping.
    """
    clips = _prepare(rows, samples, value_range, decode, decode_rows, channels, min_size)
    return _grid(clips, frames, title)


def clip_animation(
    rows: Mapping[str, Tensor | None], *, samples: int | Sequence[int] = 4,
    value_range: tuple[float, float] = (-1.0, 1.0), decode: Decoder | None = None,
    decode_rows: Sequence[str] | None = None, channels: str = "first3", min_size: int = 64,
) -> list[np.ndarray]:
    """T images (H, W, 3) uint8 of full clips: rows stacked, samples side by side, "frame t/T" top left."""
    return _animation(_prepare(rows, samples, value_range, decode, decode_rows, channels, min_size))


def _palette() -> np.ndarray:
    """Fixed GIF palette (256, 3) uint8: the 6x6x6 cube of levels 0, 51, ..., 255, then 40 greys j * 255 / 41."""
    levels = np.arange(6) * 51
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(216, 3)
    greys = np.round(np.arange(1, 41) * 255 / 41)[:, None].repeat(3, axis=1)
    return np.concatenate([cube, greys]).astype(np.uint8)


GIF_PALETTE = _palette()


def quantize(image: np.ndarray) -> np.ndarray:
    """Nearest :data:`GIF_PALETTE` index (H, W) uint8 of an (H, W, 3) uint8 image (squared RGB distance)."""
    c = image.astype(np.int32)
    q = (c + 25) // 51
    cube_err = ((c - q * 51) ** 2).sum(-1)
    j = np.clip(np.round(c.mean(-1) * 41 / 255), 1, 40).astype(np.int32)
    grey_err = ((c - GIF_PALETTE[215 + j, :1].astype(np.int32)) ** 2).sum(-1)
    cube_idx = q[..., 0] * 36 + q[..., 1] * 6 + q[..., 2]
    return np.where(grey_err < cube_err, 215 + j, cube_idx).astype(np.uint8)


def lzw_encode(data: bytes) -> bytes:
    """GIF LZW of 8-bit indices: clear code first, 9-12 bit codes packed LSB first, clear when the table is full."""
    clear, table, next_code, size = 256, {}, 258, 9
    out, acc, nbits = bytearray(), clear, 9
    prefix = data[0]
    for b in data[1:]:
        key = (prefix << 8) | b
        code = table.get(key)
        if code is not None:
            prefix = code
            continue
        acc |= prefix << nbits
        nbits += size
        if next_code < 4096:
            table[key] = next_code
            next_code += 1
            if next_code > (1 << size) and size < 12:
                size += 1
        else:
            acc |= clear << nbits
            nbits += size
            table, next_code, size = {}, 258, 9
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
        prefix = b
    acc |= prefix << nbits
    nbits += size
    if next_code < 4096 and next_code + 1 > (1 << size) and size < 12:  # the decoder adds one entry here
        size += 1
    acc |= 257 << nbits  # end-of-information code
    nbits += size
    return bytes(out) + acc.to_bytes((nbits + 7) // 8, "little")


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float, *, loop: int = 0) -> None:
    """Write RGB frames (H, W, 3) uint8 as a GIF89a (fixed palette, LZW, NETSCAPE2.0 loop; atomic).

    Frame delay is ``max(2, round(100 / fps))`` hundredths of a second; ``loop=0`` repeats forever.
    """
    check_positive("write_gif", "fps", fps)
    if not frames:
        raise ValueError("write_gif needs at least one frame (H, W, 3) uint8.")
    shape = frames[0].shape
    for i, frame in enumerate(frames):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
            raise ValueError(f"write_gif frame {i} is {frame.dtype} {frame.shape}; every frame must be "
                             f"(H, W, 3) uint8 of one size (frame 0 is {shape}).")
    h, w = shape[:2]
    if max(h, w) > 65535 or not 0 <= loop <= 65535:
        raise ValueError(f"write_gif: size {w}x{h} and loop={loop} must be at most 65535.")
    delay = max(2, round(100 / fps))
    parts = [b"GIF89a", struct.pack("<HHBBB", w, h, 0xF7, 0, 0), GIF_PALETTE.tobytes(),
             b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + struct.pack("<H", loop) + b"\x00"]
    for frame in frames:
        data = lzw_encode(quantize(frame).tobytes())
        blocks = b"".join(bytes([len(data[i : i + 255])]) + data[i : i + 255] for i in range(0, len(data), 255))
        parts += [b"\x21\xf9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00",
                  b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0), b"\x08", blocks, b"\x00"]
    parts.append(b"\x3b")
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(path)


def write_training_visual(
    out_dir: str | Path, step: int, rows: Mapping[str, Tensor | None], *, samples: int | Sequence[int] = 4,
    frames: Sequence[FrameSpec] = FRAME_NAMES, value_range: tuple[float, float] = (-1.0, 1.0),
    decode: Decoder | None = None, decode_rows: Sequence[str] | None = None, channels: str = "first3",
    min_size: int = 64, fps: float = 8.0, gif: bool = True,
) -> VisualPaths:
    """Write ``visual-{step:06d}.png`` (:func:`sample_grid`, titled "step N") and ``.gif`` (full clips) in out_dir.

    Rows are decoded and converted once for both files.
    """
    if step < 0:
        raise ValueError(f"write_training_visual step={step} must be >= 0 (the training iteration).")
    check_positive("write_training_visual", "fps", fps)
    clips = _prepare(rows, samples, value_range, decode, decode_rows, channels, min_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"visual-{step:06d}.png"
    write_png(png, _grid(clips, frames, f"step {step}"))
    gif_path = out / f"visual-{step:06d}.gif" if gif else None
    if gif_path is not None:
        write_gif(gif_path, _animation(clips), fps)
    return VisualPaths(png, gif_path)
