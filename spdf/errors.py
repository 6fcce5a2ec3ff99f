"""spdf's user errors: problems the user can fix (a setting, a name, a path, a damaged file, a full disk, a run
directory in use). `spdf` prints such an error as one line and exits 2; any other exception is a bug and reaches the
user with its traceback.

Every spdf error class for such a problem derives from SpdfUserError (RecipeError, DataError, CheckpointError,
WriteError, ManifestError, RunDirLocked, EvaluationError). It is a ValueError, as each of those classes already was,
so library code that catches ValueError around spdf's calls keeps working.
"""


class SpdfUserError(ValueError):
    """A problem the user can fix; its message is one line naming the key, file or value and what is allowed."""


class CheckpointError(SpdfUserError):
    """A checkpoint or export that is missing, corrupt, truncated or does not fit what it is loaded into."""
