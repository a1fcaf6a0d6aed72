"""Errors that describe a user's input mistake; the CLI prints them without a traceback."""


class FedgeError(Exception):
    """A problem the user can fix: bad data, unknown model, unwritable path."""


class DataError(FedgeError):
    """A data file that cannot be read as training examples; the message names file and line."""


class ModelError(FedgeError):
    """A model source that is missing, corrupt or unsupported."""
