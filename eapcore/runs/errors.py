"""The runner's errors: each message says what went wrong and what to do; finished work is kept."""
from __future__ import annotations


class RunError(RuntimeError):
    """A run could not finish; the message says why and what to do. Finished work is kept."""


class Cancelled(RunError):
    """The run was cancelled (cancel(key), SIGTERM or Ctrl-C); finished work is kept."""
