"""Errors of the launch that the CLIs turn into one line (imported by the parsers: no torch here)."""


class LaunchError(ValueError):
    """The launch does not fit the parallel sizes; the message names the flags and the launcher's numbers."""
