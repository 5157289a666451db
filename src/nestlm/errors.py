"""The errors nestlm raises for inputs the user can fix. Imports nothing: every module may import it.

    ConfigError              a configuration that can't describe a valid model or run (a ValueError)
    BudgetError              a budget the checkpoint doesn't have (a ConfigError; lists its budgets)
    CheckpointError          a folder that can't be read: missing, truncated or inconsistent files
    UnsupportedArchitecture  a checkpoint whose model_type / features nestlm does not convert
"""


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model (bad pattern, widths that don't divide...)."""


class BudgetError(ConfigError):
    """A budget (name, fraction) that the checkpoint doesn't have; the message lists the budgets it has.
    Raised by nestlm.elastic.artifact.resolve_budget, the one place budgets are resolved."""


class CheckpointError(RuntimeError):
    """A checkpoint folder that can't be read: missing, truncated or inconsistent files."""


class UnsupportedArchitecture(CheckpointError):
    """A checkpoint whose model_type / features nestlm does not convert."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long run; the message says what was kept (the last checkpoint) and how to go on."""
