"""Training visual: grid positions and colors, value mapping, labels, GIF round trip (own decoder), errors."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import torch

from distill_mixins.eval import sample_grid, write_gif, write_training_visual
from distill_mixins.eval.visual import (
    BLOCK_GAP,
    GAP,
    GIF_PALETTE,
    LINE,
    PAD,
    clip_animation,
    frame_index,
    grid_layout,
    lzw_encode,
    text_width,
)

torch.set_num_threads(1)
NAMES = ["student 1-step", "teacher 1-step", "condition", "ground truth"]


def color(row: int, sample: int, t: int) -> tuple[int, int, int]:
    """A distinct RGB color per (row, sample, frame), never white, black or magenta."""
    return 10 + 20 * t, 30 + 40 * row, 50 + 60 * sample


def constant_clips(batch: int = 3, frames: int = 8, size: int = 32) -> dict[str, torch.Tensor]:
    """Rows whose frames are constant colors ``color(row, sample, t)``, mapped to [-1, 1]."""
    rows = {}
    for r, name in enumerate(NAMES):
        clip = torch.empty(batch, 3, frames, size, size)
        for s in range(batch):
            for t in range(frames):
                clip[s, :, t] = torch.tensor(color(r, s, t), dtype=torch.float32)[:, None, None] / 127.5 - 1
        rows[name] = clip
    return rows


def decode_gif(data: bytes) -> dict:
    """Minimal GIF89a decoder: global palette, loop count, delays and RGB frames (full-size, no interlace)."""
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
    w, h, packed = struct.unpack("<HHB", data[6:11])
    assert packed & 0x80, "global color table expected"
    n = 2 ** ((packed & 7) + 1)
    palette = np.frombuffer(data[13 : 13 + 3 * n], dtype=np.uint8).reshape(n, 3)
    pos, frames, delays, loop = 13 + 3 * n, [], [], None
    while data[pos] != 0x3B:
        kind = data[pos]
        if kind == 0x21:  # extension: label, then sub-blocks
            label, pos, body = data[pos + 1], pos + 2, b""
            while data[pos]:
                body, pos = body + data[pos + 1 : pos + 1 + data[pos]], pos + 1 + data[pos]
            pos += 1
            if label == 0xF9:
                delays.append(struct.unpack("<H", body[1:3])[0])
            elif label == 0xFF and body[:11] == b"NETSCAPE2.0":
                loop = struct.unpack("<H", body[12:14])[0]
        else:
            assert kind == 0x2C
            x, y, fw, fh, fpacked = struct.unpack("<HHHHB", data[pos + 1 : pos + 10])
            assert (x, y, fw, fh, fpacked) == (0, 0, w, h, 0)
            min_size, pos, lzw = data[pos + 10], pos + 11, b""
            while data[pos]:
                lzw, pos = lzw + data[pos + 1 : pos + 1 + data[pos]], pos + 1 + data[pos]
            pos += 1
            indices = lzw_decode(lzw, min_size)
            assert len(indices) == w * h
            frames.append(palette[np.frombuffer(indices, dtype=np.uint8)].reshape(h, w, 3))
    return {"size": (h, w), "palette": palette, "frames": frames, "delays": delays, "loop": loop}


def lzw_decode(data: bytes, min_size: int) -> bytes:
    """Strict GIF LZW decoder: widths grow when the table reaches 2**width; must end with the end code."""
    clear, end = 1 << min_size, (1 << min_size) + 1
    bits = int.from_bytes(data, "little")
    pos, out, table, size, prev = 0, bytearray(), [], min_size + 1, None
    while True:
        code = (bits >> pos) & ((1 << size) - 1)
        pos += size
        if code == clear:
            table, size, prev = [bytes([i]) for i in range(clear)] + [b"", b""], min_size + 1, None
            continue
        if code == end:
            assert pos <= 8 * len(data) and bits >> pos == 0, "data after the end code"
            return bytes(out)
        entry = table[code] if code < len(table) else prev + prev[:1]
        assert code <= len(table)
        out += entry
        if prev is not None and len(table) < 4096:
            table.append(prev + entry[:1])
            if len(table) == 1 << size and size < 12:
                size += 1
        prev = entry


def test_frame_indices_first_middle_last():
    assert [frame_index(f, 8) for f in ("first", "middle", "last")] == [0, 3, 7]
    assert [frame_index(f, 2) for f in ("first", "middle", "last")] == [0, 0, 1]
    assert [frame_index(f, 1) for f in ("first", "middle", "last")] == [0, 0, 0]
    assert frame_index(-1, 8) == 7 and frame_index(5, 8) == 5


def test_grid_places_constant_frames_at_known_positions():
    rows = constant_clips()
    img = sample_grid(rows, samples=3)
    layout = grid_layout(3, 4, 3, (64, 64), NAMES)
    assert img.shape == (layout.height, layout.width, 3) and img.dtype == np.uint8
    # hand-computed geometry: margin fits "student 1-step" (14 chars x 12 px - 2), cells 64 px (32 upscaled x2)
    margin = PAD + 14 * 12 - 2 + 2 * PAD
    assert layout.origin(0, 0, 0) == (PAD + 2 * LINE, margin) == (40, 178)
    assert layout.origin(1, 2, 1) == (40 + 2 * 66, 178 + (3 * 64 + 2 * GAP + BLOCK_GAP) + 66)
    for s in range(3):
        for r in range(4):
            for c, t in enumerate((0, 3, 7)):
                y, x = layout.origin(s, r, c)
                cell = img[y : y + 64, x : x + 64]
                assert (cell == color(r, s, t)).all(), (s, r, c)
                assert (img == color(r, s, t)).all(-1).sum() == 64 * 64  # nowhere else in the image
    for t in (1, 2, 4, 5, 6):  # frames not shown
        assert not (img == color(0, 0, t)).all(-1).any()
    print(f"grid {img.shape}, first cell at {layout.origin(0, 0, 0)}")


def test_upscale_is_integer_nearest_neighbour():
    frame = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 1, 8, 8)
    img = sample_grid({"a": frame[:, :1]}, frames=("first",), value_range=(0, 255))
    layout = grid_layout(1, 1, 1, (64, 64), ["a"])
    y, x = layout.origin(0, 0, 0)
    cell = img[y : y + 64, x : x + 64, 0]
    assert np.array_equal(cell, np.kron(np.arange(64).reshape(8, 8), np.ones((8, 8), dtype=int)))
    wide = sample_grid({"a": torch.zeros(1, 3, 2, 50, 100)}, min_size=64, frames=(0,))
    wide_layout = grid_layout(1, 1, 1, (100, 200), ["a"])  # 50 x 100 frame: factor ceil(64 / 50) = 2
    assert wide.shape[:2] == (wide_layout.height, wide_layout.width)


def one_pixel(values: torch.Tensor, **kwargs) -> np.ndarray:
    """Colors of a (C, N) set of pixels drawn as a 1 x N frame at scale 1."""
    clip = values.reshape(1, values.shape[0], 1, 1, -1)
    img = sample_grid({"x": clip}, frames=("first",), min_size=1, **kwargs)
    y, x = grid_layout(1, 1, 1, (1, values.shape[1]), ["x"]).origin(0, 0, 0)
    return img[y, x : x + values.shape[1]]


def test_value_range_mapping_and_channels():
    v = torch.tensor([[0.0, 0.5, 1.0, -3.0, 7.0, 0.25]])
    assert one_pixel(v, value_range=(0, 1))[:, 0].tolist() == [0, 128, 255, 0, 255, 64]  # C=1: grey
    assert (one_pixel(v, value_range=(0, 1)) == one_pixel(v, value_range=(0, 1))[:, :1]).all()
    assert one_pixel(torch.tensor([[-1.0, 0.0, 1.0]]))[:, 0].tolist() == [0, 128, 255]  # default (-1, 1)
    four = torch.tensor([[0.0], [0.2], [0.4], [1.0]])
    assert one_pixel(four, value_range=(0, 1)).tolist() == [[0, 51, 102]]  # first three channels
    assert one_pixel(four, value_range=(0, 1), channels="mean").tolist() == [[102, 102, 102]]  # mean 0.4
    assert one_pixel(four[:2], value_range=(0, 1)).tolist() == [[26, 26, 26]]  # C=2: mean 0.1 -> 25.5


def test_non_finite_pixels_are_magenta_with_a_warning():
    v = torch.tensor([[0.0, float("nan"), 1.0, float("inf")], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    with pytest.warns(RuntimeWarning, match="2 pixels with non-finite"):
        px = one_pixel(v, value_range=(0, 1))
    assert px.tolist() == [[0, 0, 0], [255, 0, 255], [255, 255, 255], [255, 0, 255]]


def test_labels_change_only_the_margin():
    clip = constant_clips(batch=1)["student 1-step"]
    a = sample_grid({"abc 1-step": clip, "xyz": clip}, samples=1)
    b = sample_grid({"def 2-step": clip, "uvw": clip}, samples=1)
    layout = grid_layout(1, 2, 3, (64, 64), ["abc 1-step"])
    ys, xs = np.nonzero((a != b).any(-1))
    assert len(ys) > 100 and xs.max() < layout.margin and ys.min() >= layout.top
    label_band = a[layout.top : layout.top + 64, PAD : PAD + text_width("abc 1-step")]
    assert (label_band == 0).all(-1).sum() > 50  # black text drawn in the first row's band
    print(f"label pixels changed: {len(ys)}, all at x < {layout.margin}")


def test_none_rows_are_skipped_and_decode_applies_to_named_rows():
    rows = constant_clips(batch=2, frames=4, size=16)
    latent = torch.zeros(2, 4, 4, 4, 4)
    latent[:, :3] = rows["ground truth"][:, :, :, ::4, ::4]
    calls = []

    def decode(z):
        calls.append(tuple(z.shape))
        return z[:, :3].repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)

    mixed = {"student 1-step": rows["student 1-step"], "teacher 1-step": None, "ground truth": latent}
    img = sample_grid(mixed, decode=decode, decode_rows=["ground truth"], samples=1)
    assert calls == [(1, 4, 4, 4, 4)]  # only the chosen sample of the named row
    plain = sample_grid({"student 1-step": rows["student 1-step"], "ground truth": rows["ground truth"]}, samples=1)
    assert np.array_equal(img, plain)


def test_clip_animation_frames_show_every_frame():
    rows = constant_clips(batch=2, frames=5, size=16)
    frames = clip_animation(rows)
    layout = grid_layout(2, 4, 1, (64, 64), [*NAMES, "frame 5/5"])
    assert len(frames) == 5 and all(f.shape == (layout.height, layout.width, 3) for f in frames)
    for t, img in enumerate(frames):
        for s in range(2):
            for r in range(4):
                y, x = layout.origin(s, r, 0)
                assert (img[y : y + 64, x : x + 64] == color(r, s, t)).all()
    assert not np.array_equal(frames[0][: layout.top, : layout.margin], frames[1][: layout.top, : layout.margin])


def test_gif_round_trip_frames_size_palette_and_loop(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 40 * 60).reshape(40, 60)
    frames = [np.stack([smooth, np.roll(smooth, 7 * i, 1), 255 - smooth], -1).astype(np.uint8) for i in range(3)]
    frames.append(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    path = tmp_path / "clip.gif"
    write_gif(path, frames, fps=4)
    gif = decode_gif(path.read_bytes())
    assert gif["size"] == (40, 60) and len(gif["frames"]) == 4 and gif["delays"] == [25] * 4 and gif["loop"] == 0
    assert np.array_equal(gif["palette"], GIF_PALETTE)
    pal = gif["palette"].astype(int)
    for src, out in zip(frames, gif["frames"], strict=True):
        err = ((src.astype(int) - out.astype(int)) ** 2).sum(-1)
        best = ((src.astype(int)[:, :, None] - pal[None, None]) ** 2).sum(-1).min(-1)
        assert np.array_equal(err, best)  # nearest palette color
        assert err.max() <= 3 * 25**2
    exact = GIF_PALETTE[rng.integers(0, 256, 30 * 20)].reshape(30, 20, 3)
    write_gif(path, [exact], fps=100)
    back = decode_gif(path.read_bytes())
    assert np.array_equal(back["frames"][0], exact) and back["delays"] == [2]
    assert not list(tmp_path.glob("*.tmp"))
    print(f"gif bytes {path.stat().st_size}, max squared error {err.max()} <= {3 * 25**2}")


@pytest.mark.parametrize("length", [1, 2, 250, 253, 254, 255, 256, 257, 258, 300, 9000])
def test_lzw_round_trip_around_code_width_changes_and_table_reset(length):
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    assert lzw_decode(lzw_encode(data), 8) == data  # 9000 random bytes overflow the 4096-code table
    runs = bytes(length)  # long runs: long strings, few codes
    assert lzw_decode(lzw_encode(runs), 8) == runs


def test_lzw_round_trip_all_lengths_near_width_boundary():
    data = np.random.default_rng(1).integers(0, 256, 1400, dtype=np.uint8).tobytes()
    for n in range(230, 1300, 7):
        assert lzw_decode(lzw_encode(data[:n]), 8) == data[:n]


def read_png_size(path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    w, h = struct.unpack(">II", raw[16:24])
    idat = raw[raw.index(b"IDAT") + 4 : raw.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == h * (1 + 3 * w)
    return h, w


def test_write_training_visual_names_and_contents(tmp_path):
    rows = constant_clips(batch=2, frames=4, size=16)
    start = time.perf_counter()
    paths = write_training_visual(tmp_path / "visuals", 500, rows, fps=10)
    elapsed = time.perf_counter() - start
    assert paths.png.name == "visual-000500.png" and paths.gif.name == "visual-000500.gif"
    assert read_png_size(paths.png) == sample_grid(rows, title="step 500").shape[:2]
    gif = decode_gif(paths.gif.read_bytes())
    assert len(gif["frames"]) == 4 and gif["delays"] == [10] * 4
    assert gif["size"] == clip_animation(rows)[0].shape[:2]
    only_png = write_training_visual(tmp_path / "visuals", 7, rows, gif=False)
    assert only_png.gif is None and only_png.png.name == "visual-000007.png"
    assert sorted(p.name for p in (tmp_path / "visuals").iterdir()) == [
        "visual-000007.png", "visual-000500.gif", "visual-000500.png"]
    print(f"training visual (PNG + 4-frame GIF) in {elapsed:.2f} s")


def test_errors_name_the_problem():
    clip = torch.zeros(2, 3, 4, 8, 8)
    cases = [
        ({}, {}, "non-empty mapping"),
        ({"a": None}, {}, "is None"),
        ({"a": torch.zeros(2, 3, 8, 8)}, {}, r"row 'a' must be a tensor \(B, C, T, H, W\)"),
        ({"a": clip, "b": torch.zeros(3, 3, 4, 8, 8)}, {}, "batch size B"),
        ({"a": clip, "b": torch.zeros(2, 3, 5, 8, 8)}, {}, "share T, H, W"),
        ({"a": clip, "b": torch.zeros(2, 3, 4, 8, 9)}, {}, "share T, H, W"),
        ({"a": clip}, {"frames": ("first", "middel")}, "middel"),
        ({"a": clip}, {"frames": (4,)}, "out of range for T=4"),
        ({"a": clip}, {"frames": "first"}, "at least one frame"),
        ({"a": clip}, {"value_range": (1, -1)}, "lo < hi"),
        ({"a": clip}, {"samples": [5]}, r"\[0, 2\)"),
        ({"a": clip}, {"samples": 0}, "must be >= 1"),
        ({"a": clip}, {"channels": "rgb"}, "channels='rgb' is not known"),
        ({"a": clip}, {"decode": lambda z: z, "decode_rows": ["b"]}, r"unknown rows \['b'\]"),
        ({"a": clip}, {"decode": lambda z: z[0]}, "decode returned"),
    ]
    for rows, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sample_grid(rows, **kwargs)
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    for frames, fps, match in [([], 1, "at least one"), ([good, good[:2]], 1, "frame 1"),
                               ([good.astype(np.float32)], 1, "uint8"), ([good], 0, "fps")]:
        with pytest.raises(ValueError, match=match):
            write_gif("unused.gif", frames, fps)
    with pytest.raises(ValueError, match="step=-1"):
        write_training_visual("unused", -1, {"a": clip})
