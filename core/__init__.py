"""The bottom layer every package imports: settings, the error base, small shared file I/O, where
files are kept (a local path or an object-store URI: `storage`) and passwords out of URLs (`redact`).

It imports nothing of ours, so anything above may use it without a cycle.
"""

from core.errors import CityServeError, ConfigError, DataError, Interrupted, InvalidInput, RegistryError
from core.io import replacing, sha256_file, write_bytes_atomic, write_json_atomic
from core.redact import has_password, redact
from core.settings import Settings, get_settings
from core.storage import Location

__all__ = [
    "CityServeError", "ConfigError", "DataError", "Interrupted", "InvalidInput", "Location", "RegistryError",
    "Settings", "get_settings", "has_password", "redact", "replacing", "sha256_file", "write_bytes_atomic",
    "write_json_atomic",
]
