"""The one error type conversion raises for bad input (the CLI prints it without a traceback)."""


from allava_jax.errors import UserError


class ConvertError(UserError):
    """Bad conversion input: the message names the file or tensor and the reason."""
