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

Storage: without a window, one contiguous buffer per keys / values, frame-major, grown by doubling up to
``max_frames``; a store copies the chunk into its slots and :meth:`KVCache.context` returns a view of the prefix (no
copy: a per-frame concatenation at every call was a third of a 32-frame rollout's time). With a window, frame by
frame (the frames kept are not one slice).
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
        self._frames: dict[int, tuple[Tensor, Tensor]] = {}  # with a window: frame -> (k, v)
        self._buffer: tuple[Tensor, Tensor] | None = None  # without one: (k, v) (B, H, capacity * tokens, D)
        self._stored: set[int] = set()

    # ------------------------------------------------------------------------------------------------ write

    def store(self, start_frame: int, k: Tensor, v: Tensor) -> None:
        """Write the keys and values (B, H, n * tokens_per_frame, D) of frames ``start_frame ..`` (detached)."""
        n = self._frames_in(k, "k")
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"KVCache.store: k {tuple(k.shape)} and v {tuple(v.shape)} differ in (B, H, tokens).")
        self._check_range(start_frame, n)
        t = self.tokens_per_frame
        if self.window is None:
            buffer_k, buffer_v = self._reserve(k, v, start_frame + n)
            with torch.no_grad():
                buffer_k[:, :, start_frame * t : (start_frame + n) * t].copy_(k)
                buffer_v[:, :, start_frame * t : (start_frame + n) * t].copy_(v)
            self._stored.update(range(start_frame, start_frame + n))
            return
        for i in range(n):
            piece = slice(i * t, (i + 1) * t)
            self._frames[start_frame + i] = (k[:, :, piece].detach(), v[:, :, piece].detach())
        self._evict(start_frame + n)

    def _reserve(self, k: Tensor, v: Tensor, frames: int) -> tuple[Tensor, Tensor]:
        """The buffer, holding at least ``frames`` frames of k's / v's (B, H, D), dtype and device (grown by
        doubling, the stored frames kept; a new layout is only accepted when nothing is stored)."""
        t = self.tokens_per_frame
        layout = (k.shape[:2], k.shape[3], v.shape[3], k.dtype, v.dtype, k.device)
        if self._buffer is not None:
            old_k, old_v = self._buffer
            if (old_k.shape[:2], old_k.shape[3], old_v.shape[3], old_k.dtype, old_v.dtype, old_k.device) != layout:
                if self._stored:
                    raise ValueError(
                        f"KVCache.store: keys {tuple(k.shape)} {k.dtype} do not match the cached ones "
                        f"{tuple(old_k.shape[:2])} x {old_k.shape[3]} {old_k.dtype} (another batch?): clear the "
                        "cache (clear_kv_cache()) before a new batch."
                    )
                self._buffer = None
        if self._buffer is not None and self._buffer[0].shape[2] >= frames * t:
            return self._buffer
        capacity = min(self.max_frames, max(frames, 2 * (0 if self._buffer is None else self._buffer[0].shape[2] // t)))
        grown = tuple(x.new_zeros(*x.shape[:2], capacity * t, x.shape[3]) for x in (k, v))
        if self._buffer is not None:
            held = self._buffer[0].shape[2]
            for new, old in zip(grown, self._buffer, strict=True):
                new[:, :, :held].copy_(old)
        self._buffer = (grown[0], grown[1])
        return self._buffer

    def _evict(self, end: int) -> None:  # with a window
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
        missing = [f for f in frames if f not in self._held()]
        if missing:
            raise RuntimeError(
                f"KVCache: a chunk starting at frame {start_frame} attends to frames {missing[0]}..{missing[-1]}, "
                "which are not cached: run the earlier chunks with store_kv=True first (or clear_kv_cache() and "
                "start at frame 0)."
            )
        if not frames:
            return None
        if self.window is None:  # frames 0 .. start_frame - 1: one slice
            end = start_frame * self.tokens_per_frame
            return self._buffer[0][:, :, :end], self._buffer[1][:, :, :end]
        return (torch.cat([self._frames[f][0] for f in frames], dim=2),
                torch.cat([self._frames[f][1] for f in frames], dim=2))

    def _held(self) -> set[int] | dict[int, tuple[Tensor, Tensor]]:
        return self._stored if self.window is None else self._frames

    def frame(self, frame: int) -> tuple[Tensor, Tensor]:
        """The keys and values (B, H, tokens_per_frame, D) of one held frame."""
        if frame not in self._held():
            raise KeyError(f"KVCache.frame: frame {frame} is not cached (held: {self.cached_frames}).")
        if self.window is not None:
            return self._frames[frame]
        t = slice(frame * self.tokens_per_frame, (frame + 1) * self.tokens_per_frame)
        return self._buffer[0][:, :, t], self._buffer[1][:, :, t]

    # ------------------------------------------------------------------------------------------------ state

    def clear(self) -> None:
        """Forget every frame (the buffer's memory is kept for the next batch of the same shape)."""
        self._frames.clear()
        self._stored.clear()

    @property
    def cached_frames(self) -> list[int]:
        """The frames held, in order."""
        return sorted(self._held())

    def checksum(self) -> float:
        """A float64 sum over every cached value, weighted by position (a change anywhere changes it)."""
        total = 0.0
        for frame in self.cached_frames:
            for i, tensor in enumerate(self.frame(frame)):
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
