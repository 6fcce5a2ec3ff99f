"""The one exception of spdf.data: a problem the user can fix (a path, a name, a field, a setting)."""
from ..errors import SpdfUserError


class DataError(SpdfUserError):
    """A user-caused data problem; the message is one line naming the culprit and what is allowed."""
