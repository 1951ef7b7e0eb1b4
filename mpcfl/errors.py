"""Errors shown to users as one line, without a traceback, and the exit codes they map to.

Processes report failures to their supervisor by exit code, never by message
text: a launcher tells a process's own failure from a peer's by the code alone.
"""

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1  # this process failed (bad input, its own error)
EXIT_PEER_FAILURE = 3  # this process stopped because another process failed


def first_own_failure(failed: Sequence[tuple[T, int]]) -> T | None:
    """The supervisors' policy: of processes that failed, as (process, exit code) in the order they
    ended, the first that failed on its own rather than because a peer did; ``None`` if all followed a peer."""
    return next((process for process, code in failed if code != EXIT_PEER_FAILURE), None)


def exit_code(err: BaseException) -> int:
    """The exit code for an error that ends a process."""
    return EXIT_PEER_FAILURE if isinstance(err, PeerFailure) else EXIT_ERROR


class MpcflError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits 1."""


class ConfigError(MpcflError):
    """A job file is malformed or inconsistent; the message names the file and key."""


class PeerFailure(MpcflError):
    """Another process of the job failed, died, hung past the timeout, or cut the link."""
