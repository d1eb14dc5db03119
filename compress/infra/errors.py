"""The exceptions the CLI turns into one line and a non-zero exit: a user's mistake, and a stop by SIGTERM."""


class CompressError(Exception):
    """A problem with the user's input or environment, reported as one line naming the flag or file.

    Raise it for anything the user can fix (a missing file, a bad ratio, an offline hub). Bugs stay ordinary
    exceptions so their tracebacks reach us.
    """


class Terminated(KeyboardInterrupt):
    """A run stopped by SIGTERM (a scheduler, `kill`, a container stopping). It is a KeyboardInterrupt so that every
    handler of a Ctrl-C (a search closing its cut-short trial, Optuna failing it) handles it the same way; the CLI
    exits 143 instead of 130."""


def stop_said(stop: KeyboardInterrupt) -> tuple[str, int]:
    """How a stop is named in compress's last line, and its exit code (a shell's 128 + the signal)."""
    return ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
