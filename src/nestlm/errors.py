"""The errors nestlm raises for inputs the user can fix. Imports nothing: every module may import it.

    ConfigError              a configuration that can't describe a valid model or run (a ValueError)
    CheckpointError          a folder that can't be read: missing, truncated or inconsistent files
    UnsupportedArchitecture  a checkpoint whose model_type / features nestlm does not convert
"""


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model (bad pattern, widths that don't divide...)."""


class CheckpointError(RuntimeError):
    """A checkpoint folder that can't be read: missing, truncated or inconsistent files."""


class UnsupportedArchitecture(CheckpointError):
    """A checkpoint whose model_type / features nestlm does not convert."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long run; the message says what was kept (the last checkpoint) and how to go on."""
