"""The one exception type a user sees: bad input, stated in one line.

The command line prints the message of a NanolstmError on one line and exits with status 2; anything
else escaping is a bug in nanolstm.
"""


class NanolstmError(Exception):
    """A problem with the user's input, its message a single line saying what to do."""


class DataError(NanolstmError):
    """A corpus that cannot be read or used: missing, empty, not UTF-8, too small."""


class CheckpointError(NanolstmError):
    """A checkpoint that cannot be read: truncated, corrupted, not a checkpoint, or of a newer format."""
