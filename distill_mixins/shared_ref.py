"""SharedRef: a reference that ``copy.deepcopy`` shares instead of copying (for process groups)."""

from __future__ import annotations

from typing import Any


class SharedRef:
    """Holds ``value``; a deep copy of the holder is the holder itself. A ``ProcessGroup`` cannot be copied, and a
    copied network or model (a student built from the teacher, an EMA) runs over the same group."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedRef:
        return self


__all__ = ["SharedRef"]
