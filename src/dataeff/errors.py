"""The one exception type users see: its message is a single line that names the file, line, field or value."""


class DataeffError(Exception):
    """A user-facing error. The CLI prints ``dataeff: error: <message>`` and exits non-zero."""


class DataeffWarning(UserWarning):
    """A setting that is valid but almost certainly not meant (``optim.lr=0``); the CLI prints it on one line."""
