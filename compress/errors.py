"""The one exception type the CLI turns into a clean one-line error and a non-zero exit."""


class CompressError(Exception):
    """A problem with the user's input or environment, reported as one line naming the flag or file.

    Raise it for anything the user can fix (a missing file, a bad ratio, an offline hub). Bugs stay ordinary
    exceptions so their tracebacks reach us.
    """
