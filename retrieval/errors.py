"""The exceptions a user can meet. Each carries a message written for the user; the CLI prints it in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a message that says what was kept (the CLI prints it in one line, exit code 130)."""


class ClipsearchError(Exception):
    """Base class: a problem the user can act on (exit code 1 from the CLI)."""

    exit_code = 1


class UsageError(ClipsearchError):
    """Bad arguments: a missing path, k <= 0, an unknown option value."""

    exit_code = 2


class ModelLoadError(ClipsearchError):
    """The model could not be built or its weights could not be found or downloaded."""


class ModelMismatchError(ClipsearchError):
    """The index was built with another model than the one asked for."""


class EmptyIndexError(ClipsearchError):
    """There is nothing to search yet."""


class IndexCorruptError(ClipsearchError):
    """The index folder is damaged in a way that cannot be repaired automatically."""


class UnreadableCatalogError(IndexCorruptError):
    """SQLite refuses the catalog file as a whole (a damaged header): `check --repair` salvages it."""


class ReadOnlyIndexError(ClipsearchError):
    """The index folder cannot be written (a read-only file system, or no permission); searching still works."""


class IndexBusyError(ClipsearchError):
    """Another process is writing to this index."""


class DiskFullError(ClipsearchError):
    """The disk holding the index filled up; what was committed before is intact."""
