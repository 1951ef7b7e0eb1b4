"""Errors shown to users as one line, without a traceback."""


class MpcflError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits 1."""


class ConfigError(MpcflError):
    """A job file is malformed or inconsistent; the message names the file and key."""


class PeerFailure(MpcflError):
    """Another process of the job failed, died, hung past the timeout, or cut the link."""
