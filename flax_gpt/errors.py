"""The one exception type for mistakes a user can fix (bad paths, sizes, names), and how CLIs report it."""

import sys


def first_line(e: BaseException) -> str:
    """'TypeName: the first line of its message' (200 characters at most), for one-line reports of other errors."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


class UserError(Exception):
    """A problem with the user's input; CLIs print its message in one line and exit 2."""


def run_cli(action, debug: bool = False):
    """(action(), None), or (None, 2) after printing a UserError as one `error: ...` line; --debug re-raises it."""
    try:
        return action(), None
    except UserError as e:
        if debug:
            raise
        sys.stderr.write(f"error: {e}\n")  # one write: print() writes the newline apart, and processes sharing a log interleave
        return None, 2
