"""One tolerance per dtype, defined once (STYLE.md); exceptions say why where they are made.

A module of its own (not conftest.py): test modules import these names, and with several conftest.py files in the
tree the module named ``conftest`` is whichever pytest imported last.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
WEIGHT_ATOL = 1e-6  # merge then unmerge restores W
