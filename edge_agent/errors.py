"""Errors an operator must fix. The CLI prints them as one line and exits non-zero.

Exit codes: 2 for configuration and usage mistakes (systemd must not restart on them),
1 for everything else an operator has to act on (missing model, unreadable data).
"""


class EdgeAgentError(Exception):
    """A problem the user can fix; the message names the value and the fix."""

    exit_code = 1


class ConfigError(EdgeAgentError):
    """Bad configuration or command-line usage."""

    exit_code = 2


class ModelError(EdgeAgentError):
    """A model file that is missing, corrupted, tampered with or does not fit the config."""

    exit_code = 2


class DataError(EdgeAgentError):
    """Images or folders that cannot be read or do not fit the model."""

    exit_code = 1


class CameraError(EdgeAgentError):
    """A frame source that cannot be opened."""

    exit_code = 1
