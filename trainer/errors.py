"""User-facing errors: printed as one line by the entry point, exit code 2, no traceback."""


class UserError(Exception):
    """Base class for mistakes a user can fix (config, data, checkpoint)."""


class ConfigError(UserError, ValueError):
    """A bad configuration value, raised before any process group is created."""


class DataError(UserError):
    """Missing or corrupt data / tokenizer files; the message names the path."""


class CheckpointError(UserError):
    """Missing, incomplete, corrupt or incompatible checkpoint; the message names the path."""
