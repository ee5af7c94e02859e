"""One file per method. Importing this package registers every built-in method."""

from . import adapter, freeze, fusion, ia3, lora, prefix, prompt, ptuning  # noqa: F401
