"""The one exception type for mistakes a user can fix (bad paths, sizes, names)."""


class UserError(Exception):
    """A problem with the user's input; CLIs print its message in one line and exit 2."""
