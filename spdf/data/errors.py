"""The one exception of spdf.data: a problem the user can fix (a path, a name, a field, a setting)."""


class DataError(ValueError):
    """A user-caused data problem; the message is one line naming the culprit and what is allowed."""
