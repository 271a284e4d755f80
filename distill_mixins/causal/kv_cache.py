"""KVCache: the keys and values of one attention layer, frame by frame, for chunk-by-chunk generation.

Semantics (the causal host contract, ARCHITECTURE.md "Causal students"):

- :meth:`KVCache.store` ``(start_frame, k, v)`` writes the slots of frames ``start_frame .. start_frame + n - 1``,
  overwriting what was there (storing the same chunk twice is idempotent); the tensors are detached.
- :meth:`KVCache.context` ``(start_frame)`` returns the cached keys and values of the frames a chunk starting at
  ``start_frame`` attends to besides itself: every frame before it, or, with a rolling ``window``, the ``sink``
  first frames plus the last ``window`` frames before it. A missing frame raises (prefill the earlier chunks).
- Overflow: without a window, a frame at or past ``max_frames`` raises; with one, older frames (not the sink) are
  evicted as new ones are stored, and frame indices may grow without bound (positions stay absolute).

Keys and values are (B, H, n * tokens_per_frame, D) (heads first, the layout of SDPA), frame-major along the tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-frame keys and values of one attention layer (see the module docstring).

    ``max_frames``: the largest number of frames (absolute indices ``0 .. max_frames - 1``) without a window;
    ``window``: keep only the last ``window`` frames before a chunk (plus ``sink`` first frames), or None.
    """

    def __init__(self, max_frames: int, tokens_per_frame: int, window: int | None = None, sink: int = 0) -> None:
        for name, value in (("max_frames", max_frames), ("tokens_per_frame", tokens_per_frame)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name}={value!r}: give an int >= 1.")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"KVCache window={window!r}: give an int >= 1 (frames kept), or None (no window).")
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"KVCache sink={sink!r}: give an int >= 0 (first frames always kept).")
        self.max_frames, self.tokens_per_frame, self.window, self.sink = max_frames, tokens_per_frame, window, sink
        self._frames: dict[int, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------------ write

    def store(self, start_frame: int, k: Tensor, v: Tensor) -> None:
        """Write the keys and values (B, H, n * tokens_per_frame, D) of frames ``start_frame ..`` (detached)."""
        n = self._frames_in(k, "k")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"KVCache.store: k {tuple(k.shape)} and v {tuple(v.shape)} differ in (B, H, tokens).")
        self._check_range(start_frame, n)
        t = self.tokens_per_frame
        for i in range(n):
            piece = slice(i * t, (i + 1) * t)
            self._frames[start_frame + i] = (k[:, :, piece].detach(), v[:, :, piece].detach())
        if self.window is not None:
            self._evict(start_frame + n)

    def _evict(self, end: int) -> None:
        keep_from = end - self.window
        for frame in [f for f in self._frames if self.sink <= f < keep_from]:
            del self._frames[frame]

    # ------------------------------------------------------------------------------------------------- read

    def context_frames(self, start_frame: int) -> list[int]:
        """The frames a chunk starting at ``start_frame`` attends to from the cache, in order."""
        if self.window is None:
            return list(range(start_frame))
        recent = range(max(self.sink, start_frame - self.window), start_frame)
        return [*range(min(self.sink, start_frame)), *recent]

    def context(self, start_frame: int) -> tuple[Tensor, Tensor] | None:
        """Keys and values (B, H, m * tokens_per_frame, D) of :meth:`context_frames`, or None when there are none."""
        self._check_range(start_frame, 0)
        frames = self.context_frames(start_frame)
        missing = [f for f in frames if f not in self._frames]
        if missing:
            raise RuntimeError(
                f"KVCache: a chunk starting at frame {start_frame} attends to frames {missing[0]}..{missing[-1]}, "
                "which are not cached: run the earlier chunks with store_kv=True first (or clear_kv_cache() and "
                "start at frame 0)."
            )
        if not frames:
            return None
        return (torch.cat([self._frames[f][0] for f in frames], dim=2),
                torch.cat([self._frames[f][1] for f in frames], dim=2))

    # ------------------------------------------------------------------------------------------------ state

    def clear(self) -> None:
        """Forget every frame."""
        self._frames.clear()

    @property
    def cached_frames(self) -> list[int]:
        """The frames held, in order."""
        return sorted(self._frames)

    def checksum(self) -> float:
        """A float64 sum over every cached value, weighted by position (a change anywhere changes it)."""
        total = 0.0
        for frame in self.cached_frames:
            for i, tensor in enumerate(self._frames[frame]):
                flat = tensor.double().flatten()
                weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
                total += (frame + 1) * (i + 1) * float((flat * weights.sqrt()).sum())
        return total

    def _frames_in(self, k: Tensor, name: str) -> int:
        if k.ndim != 4 or k.shape[2] % self.tokens_per_frame:
            raise ValueError(
                f"KVCache: {name} must be (B, H, n * {self.tokens_per_frame}, D) for whole frames, got "
                f"{tuple(k.shape)}."
            )
        return k.shape[2] // self.tokens_per_frame

    def _check_range(self, start_frame: int, n: int) -> None:
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"KVCache: start_frame={start_frame!r} must be an int >= 0.")
        if self.window is None and start_frame + n > self.max_frames:
            raise IndexError(
                f"KVCache: frames {start_frame}..{start_frame + n - 1} overflow the cache of {self.max_frames} frames "
                "(absolute positions): build the host with more frames, or stream with a rolling window."
            )


__all__ = ["KVCache"]
