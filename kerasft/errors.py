"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class KerasftError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The message names the file, line, key or preset at fault. The CLI prints it without a
    traceback (unless --debug) and exits with status 2.
    """
