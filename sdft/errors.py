"""The errors a user can fix: the process wrapper (`sdft.cli.run`) ends the run with the message
and exit status 1 instead of a traceback. This module imports nothing, so every floor can raise them."""

from __future__ import annotations


class UserError(Exception):
    """An input the user can fix; the message names the flag, file or key."""


class CliError(UserError, ValueError):
    """A command line that cannot work; the message names the flag."""


class DataError(UserError, ValueError):
    """Bad training data; the message names the file, row or flag."""


class HubError(UserError, RuntimeError):
    """The Hub refused or failed an upload or repository call."""


class NonFiniteError(UserError, RuntimeError):
    """Training diverged; the message names the step, the last good checkpoint and the usual causes."""


class MissingFileError(UserError, FileNotFoundError):
    """A model, checkpoint or file named on the command line is not there."""


class Finished(Exception):
    """The run did all it was asked before training (--dry_run): the process wrapper exits 0."""
