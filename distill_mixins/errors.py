"""User errors: a bad configuration or input that the user fixes, not a bug in the library.

``distill-mixins`` prints a user error as one line (``distill-mixins: error: <message>``) and exits with
status 2; any other exception is a bug and keeps its traceback. Config and input code raises
:class:`ConfigError` or :class:`MissingFileError` directly, or converts the ``ValueError``/``TypeError``/
``KeyError`` of a config constructor at that boundary with :func:`config_errors`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UsageError(Exception):
    """A configuration or input error; the message names the field or file and the fix."""


class ConfigError(UsageError, ValueError):
    """A config value, field or file that is wrong (a ``ValueError``, so ``except ValueError`` still catches it)."""


class MissingFileError(UsageError, FileNotFoundError):
    """An input file or directory that does not exist (a ``FileNotFoundError`` too)."""


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (blank lines and surrounding spaces dropped)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(error: BaseException) -> str:
    """The message of ``error`` as one line (a ``KeyError`` says which key is missing)."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        return f"missing key {error.args[0]!r}"
    return one_line(str(error)) or type(error).__name__


@contextlib.contextmanager
def config_errors(where: str = "", also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a ``ValueError``, ``TypeError`` or ``KeyError`` (or one of ``also``) raised inside into a
    :class:`ConfigError` (prefixed with ``where: ``); a :class:`UsageError` passes through unchanged.

    Wrap only code that builds configs from user input (a bad value there is the user's), never training code.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, KeyError, *also) as error:
        prefix = f"{where}: " if where else ""
        raise ConfigError(prefix + describe(error)) from error
