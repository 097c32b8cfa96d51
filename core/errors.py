"""Domain exceptions. Each carries what a user needs to fix the problem; the gateway maps them
to HTTP in one place, the CLI prints them without a traceback."""

from __future__ import annotations


class CityServeError(Exception):
    """Base of every error the platform raises on purpose. `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_json(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidInput(CityServeError):
    """A request item is well-formed but cannot be served (unknown sensor, wrong series length)."""

    code = "invalid_input"


class DataError(CityServeError):
    """A data file is refused: names the file, the column and the first bad row (0-based)."""

    code = "bad_data"

    def __init__(self, path: str, message: str, *, column: str | None = None, row: int | None = None) -> None:
        where = path
        if column is not None:
            where += f", column {column!r}"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {message}", field=column)
        self.path = path
        self.column = column
        self.row = row


class RegistryError(CityServeError):
    """A registry operation is refused (unknown version, files that do not load, no production)."""

    code = "registry"


class ConfigError(CityServeError):
    """A flag, profile or hyperparameter is refused before anything starts."""

    code = "bad_config"


class Interrupted(CityServeError):
    """A long run stopped by the user (Ctrl-C) before it finished; says how to continue it."""

    code = "interrupted"
