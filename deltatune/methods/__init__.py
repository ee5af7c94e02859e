"""One file per method. Importing this package registers every built-in method."""

from . import lora  # noqa: F401
