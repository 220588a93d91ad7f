"""Error types raised for bad user input.

Every error raised for a user's file names the file, the field and the value
so that it can be fixed without reading a traceback.
"""


class SwiftalignError(Exception):
    """Base class of all errors swiftalign raises on purpose."""


class InputError(SwiftalignError, ValueError):
    """A user-supplied file or parameter is invalid (names file, field and value)."""


class StarFileError(InputError):
    """A STAR file cannot be read or lacks a required field."""


class MrcFileError(InputError):
    """An MRC/MRCS file cannot be read or is inconsistent with its header."""
