"""The one error type the CLI turns into a one-line message and a non-zero exit (see cli.main)."""


class GptossError(Exception):
    """A problem the user can fix (bad input, missing file, ...); its message is one line."""
