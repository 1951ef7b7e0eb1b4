"""Errors shown to users as one line, without a traceback, and the exit codes they map to.

Processes report failures to their supervisor by exit code, never by message
text: a launcher tells a process's own failure from a peer's by the code alone. A process
that gave up waiting for a peer it can name says so in one line of its own (:data:`WAITING_ON`).
"""

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1  # this process failed (bad input, its own error)
EXIT_PEER_FAILURE = 3  # this process stopped because another process failed
#: The line, before its error, by which a process names the peer it gave up waiting for (``PeerFailure.waiting_on``).
WAITING_ON = "mpcfl: waiting on: "


def first_own_failure(failed: Sequence[tuple[T, int]]) -> T | None:
    """The supervisors' policy: of processes that failed, as (process, exit code) in the order they
    ended, the first that failed on its own rather than because a peer did; ``None`` if all followed a peer."""
    return next((process for process, code in failed if code != EXIT_PEER_FAILURE), None)


def first_line(err: BaseException) -> str:
    """An error's first line, or its type's name if it has no text: for one-line messages."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def exit_code(err: BaseException) -> int:
    """The exit code for an error that ends a process."""
    return EXIT_PEER_FAILURE if isinstance(err, PeerFailure) else EXIT_ERROR


class MpcflError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits 1."""


class ConfigError(MpcflError):
    """A job file is malformed or inconsistent; the message names the file and key."""


class PeerFailure(MpcflError):
    """Another process of the job failed, died, hung past the timeout, or cut the link.

    ``waiting_on``: the process this one gave up waiting for, where it knows which.
    """

    def __init__(self, message: str, *, waiting_on: str | None = None) -> None:
        super().__init__(message)
        self.waiting_on = waiting_on
