"""The base of errors a user causes (a bad path, option, config key or model directory).

The CLI and the job entrypoints print such an error as one line and exit 2, never with a
traceback; the message names the file, key or option that is wrong and what is expected."""


class UserError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it.

    A ValueError, so code that already catches ValueError for bad input keeps working."""
