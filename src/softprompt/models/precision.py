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
    "Quantize the frozen base's linear layers as it loads: none (default); int8 or nf4 (4-bit NormalFloat) by "
    "bitsandbytes, for training on less memory; int8-weight: int8 weight-only by torchao, for inference (the "
    "fastest CPU decode with --dtype bfloat16 --decode compiled; the LM head is quantized too). Embeddings and "
    "norms keep --dtype, adapters stay float32. A checkpoint saved quantized loads quantized without it."
)
QUANTIZE_NAMES = ("none", "int8", "nf4", "int8-weight")
#: The package each quantization needs, and what a user without it runs (the extra pins the tested versions).
QUANTIZE_PACKAGES = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "int8-weight": "torchao"}
QUANTIZE_INSTALL = "pip install 'softprompt[quantize]'"


def quantizes_lm_head(quantize: str, weight_bytes: int) -> bool:
    """Whether ``quantize`` over weights of ``weight_bytes`` bytes quantizes the LM head too: int8-weight over a
    16-bit base only (torch's int8-weight CPU kernel is fast for 16-bit activations; over float32 an int8 head made
    an eager decoding step 4x slower). bitsandbytes' int8/nf4 leave it as transformers does."""
    return quantize == "int8-weight" and weight_bytes < 4


class _QuietQuantizers(logging.Filter):
    """Drops log lines of the quantization libraries that would flood or mislead a run: bitsandbytes int8's notice
    that it casts its inputs to float16 (once per layer per forward pass) and, on some CPUs, that an optional kernel
    package from the hub is missing (its own CPU kernels run instead); torchao's, at import, that its CUDA-only
    kernel libraries do not load into a CPU build of torch, and torch's deprecation notice about how torchao
    registers an enum with torch.compile."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (
            message.startswith(("MatMul8bitLt: inputs will be cast", "Failed to load CPU gemm_4bit"))
            or (record.name == "torchao" and message.startswith("Failed to load"))
            or (record.name == "torch.utils._pytree" and "register_constant" in message)
        )


def quiet_quantizer_logs() -> None:
    """Attach the filter before anything imports bitsandbytes or torchao: PEFT, accelerate and transformers import
    them whenever they are installed, and both log at import."""
    for logger in (
        "bitsandbytes.autograd._functions",
        "bitsandbytes.backends.cpu.ops",
        "torchao",
        "torch.utils._pytree",
    ):
        logging.getLogger(logger).addFilter(_QuietQuantizers())


# At import: `softprompt/__init__.py` imports this module before anything else, so it runs before they load.
quiet_quantizer_logs()
