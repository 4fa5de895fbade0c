"""Errors a user can cause and fix. The CLI prints them on one line and exits with `exit_code`."""

# Exit statuses, documented in the README.
EXIT_SOME_INPUTS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CapcliError(Exception):
    """A problem the user can fix; the message says what to do."""

    exit_code = EXIT_USAGE


class ModelError(CapcliError):
    """A model dir, encoder or language model is missing, corrupt or does not match."""


class DataError(CapcliError):
    """A data set, split or feature cache cannot be used."""


class InputError(CapcliError):
    """One input (an image) could not be used; a batch job reports it and goes on without it."""

    exit_code = EXIT_SOME_INPUTS_FAILED

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Rebuilt from (path, reason), not from the joined message, so it crosses from a DataLoader worker.
        return type(self), (self.path, self.reason)
