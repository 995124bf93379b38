"""User-facing errors: the CLI prints these as one line, never a traceback."""


class MoetierError(Exception):
    """A mistake the user can fix (bad path, bad checkpoint, bad budget, bad request)."""


class CheckpointError(MoetierError):
    """The checkpoint is missing, corrupt, or does not match its config."""


class UnsupportedModelError(MoetierError):
    """The checkpoint's architecture is not one moetier runs."""
