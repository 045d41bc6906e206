"""The one exception type for mistakes a user can fix (bad params, missing data, wrong checkpoint).

The CLI prints a UserError as one plain message and exits with status 2; any other exception is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in words that name the key, file or value."""
