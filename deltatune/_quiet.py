"""Keep optional backends quiet: ``import deltatune`` and every CLI command print nothing they did not cause.

transformers imports torchao and bitsandbytes when they are installed, even when no run uses them, and on a CPU
machine they log at import time: torchao that its CUDA kernels do not load, torch's pytree that torchao registers
Enums the old way, bitsandbytes that the optional ``kernels`` package is missing (and ``kernels``, when it is
there and the hub is offline, that it skips its publisher check), diffusers that torchao's old tensor classes are
gone. None of it concerns a deltatune run, and such lines before every command hide the lines that do. Only
these named loggers are raised to ERROR, and only while nobody has set a level on them, so a user who configures
logging keeps the last word.
"""

from __future__ import annotations

import logging

NOISY = (
    "torchao",
    "torch.utils._pytree",
    "bitsandbytes.backends.cpu.ops",
    "diffusers.quantizers.torchao.torchao_quantizer",  # "Unable to import `torchao` Tensor objects" (torchao 0.16+)
    "kernels._internals.hf_hub",  # "Skipping publisher trust check ... offline mode" (kernels 0.19.1)
)


def quiet_optional_backends() -> None:
    """Raise the import-time loggers of optional backends (``NOISY``) to ERROR unless a level is already set."""
    for name in NOISY:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)
