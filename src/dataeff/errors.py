"""The one exception type users see: its message is a single line that names the file, line, field or value."""


class DataeffError(Exception):
    """A user-facing error. The CLI prints ``dataeff: error: <message>`` and exits non-zero."""
