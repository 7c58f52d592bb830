"""The frozen base's precision options, declared once: the weights' dtype and their quantization.

Names and help texts only, no torch import: the server's settings build their flags from these without
loading torch. `softprompt.models.loading` turns them into what transformers takes.
"""

from __future__ import annotations

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
