"""The trainers: one run function over stages (pt, sft, cls, tag, seq2seq), built on the HF Trainer."""

from .config import RunConfig, build, load_recipe
from .run import evaluate, train

__all__ = ["RunConfig", "build", "evaluate", "load_recipe", "train"]
