"""User-facing errors.

Everything a user can cause (a missing file, a corrupt scan, a wrong config key) raises
:class:`MedidiffError` with a message that names the file and the problem. The command line prints
that message alone and exits non-zero; a traceback is shown only under ``--debug``. Programming
errors keep their ordinary exception types so that they are never mistaken for bad input.
"""

from __future__ import annotations

from os import PathLike


class MedidiffError(Exception):
    """An error caused by the user's input or configuration.

    Args:
        message: what is wrong, in words a user can act on.
        path: the file or folder concerned, prefixed to the message when given.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
