"""The one error type commands raise for bad input; the app turns it into one line on stderr."""


class TformerError(Exception):
    """A user-facing error: its message says what is wrong, where, and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
