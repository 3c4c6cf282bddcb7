"""flaxlm's own error types.

Every problem with user input (a data file, a config, a checkpoint) is reported as a `FlaxlmError`, a
`ValueError` whose one-line message names what is wrong and where. The CLI prints the message and exits
non-zero; anything else escaping is a bug.
"""

import os


class FlaxlmError(ValueError):
    """Base class of every error flaxlm raises for bad input."""


class DataError(FlaxlmError):
    """A data file or data argument is unusable.

    The message reads "path:line: message" (or "path: message" without a line, or just "message" when the
    problem is not tied to a file). `path`, `line` and `message` stay available as attributes.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.line = line
        where = self.path if self.path is not None else ""
        if line is not None:
            where = f"{where}:{line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):
        return type(self), (self.message, self.path, self.line)


class ConfigError(FlaxlmError):
    """A config file, key or value is invalid.

    The message reads "file: key.path: message"; `file` and `key` are omitted when unknown.
    """

    def __init__(self, message: str, key: str | None = None, file: str | os.PathLike | None = None):
        self.message = message
        self.key = key or None
        self.file = None if file is None else os.fspath(file)
        parts = [p for p in (self.file, self.key) if p]
        super().__init__(": ".join(parts + [message]))

    def __reduce__(self):
        return type(self), (self.message, self.key, self.file)
