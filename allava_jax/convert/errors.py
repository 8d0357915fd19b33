"""The one error type conversion raises for bad input (the CLI prints it without a traceback)."""


class ConvertError(ValueError):
    """Bad conversion input: the message names the file or tensor and the reason."""
