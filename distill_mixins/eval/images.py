"""Dependency-free pictures: a PNG writer and scatter panels of 2D projections."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image as PNG (atomic: temporary file, then rename)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_png needs an (H, W, 3) uint8 array, got {image.dtype} {image.shape}.")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


def scatter_panel(
    points: np.ndarray, colors: np.ndarray, *, size: int = 256, extent: float = 1.6, dot: int = 1
) -> np.ndarray:
    """Render 2D points (N, 2) with RGB colors (N, 3) uint8 on a white (size, size, 3) panel.

    The panel spans ``[-extent, extent]`` on both axes; points outside are dropped; a grey frame
    and cross mark the axes.
    """
    panel = np.full((size, size, 3), 255, dtype=np.uint8)
    panel[size // 2, :] = panel[:, size // 2] = 225
    panel[[0, -1], :] = panel[:, [0, -1]] = 160
    pix = np.round((points / extent * 0.5 + 0.5) * (size - 1)).astype(int)
    col, row = pix[:, 0], size - 1 - pix[:, 1]
    inside = (col >= dot) & (col < size - dot) & (row >= dot) & (row < size - dot)
    for dr in range(-dot + 1, dot):
        for dc in range(-dot + 1, dot):
            panel[row[inside] + dr, col[inside] + dc] = colors[inside]
    return panel


def hstack_panels(panels: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels (H, W, 3) side by side with white gaps."""
    h = panels[0].shape[0]
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for panel in panels:
        parts += [panel, spacer]
    return np.concatenate(parts[:-1], axis=1)
