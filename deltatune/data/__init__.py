"""Data: loaders, chat/instruction templates, prompt-loss masking, packing, collators."""

from .load import DataError, Row, read_rows
from .tasks import Collator, pack
from .templates import IGNORE_INDEX, TEMPLATES

__all__ = ["IGNORE_INDEX", "TEMPLATES", "Collator", "DataError", "Row", "pack", "read_rows"]
