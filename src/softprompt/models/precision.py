"""The frozen base's precision options, declared once: the weights' dtype and their quantization.

Names and help texts only, no torch import: the server's settings build their flags from these without
loading torch. `softprompt.models.loading` turns them into what transformers takes.
"""

from __future__ import annotations

import logging

#: The frozen base's weight dtype: stored and multiplied in it; adapters, their gradients, optimizer state and losses
#: stay float32 whatever it is.
DTYPE_HELP = (
    "Frozen base weights' dtype: float32 (default), bfloat16 or float16 (adapters, gradients and optimizer "
    "state stay float32)."
)
DTYPE_NAMES = ("float32", "bfloat16", "float16")

QUANTIZE_HELP = (
    "Quantize the frozen base's linear layers as it loads, with bitsandbytes: none (default), int8 or nf4 "
    "(4-bit NormalFloat); embeddings, norms and the LM head keep --dtype, adapters stay float32. A checkpoint "
    "saved quantized loads quantized without it."
)
QUANTIZE_NAMES = ("none", "int8", "nf4")
#: What a user without bitsandbytes runs (the extra pins the tested version).
QUANTIZE_INSTALL = "pip install 'softprompt[quantize]'"


class _QuietBitsandbytes(logging.Filter):
    """Drops two bitsandbytes log lines that would flood or mislead a run: int8's notice that it casts its
    inputs to float16 (once per layer per forward pass) and, on some CPUs, that an optional kernel package
    from the hub is missing (its own CPU kernels run instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("MatMul8bitLt: inputs will be cast", "Failed to load CPU gemm_4bit"))


def quiet_bitsandbytes_logs() -> None:
    """Attach the filter before anything imports bitsandbytes: PEFT and accelerate import it whenever it is
    installed, and its CPU backend logs the missing-kernel line at import."""
    for logger in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(logger).addFilter(_QuietBitsandbytes())


# At import: `softprompt/__init__.py` imports this module before anything else, so it runs before bitsandbytes loads.
quiet_bitsandbytes_logs()
