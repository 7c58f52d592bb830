"""The ``decode`` option, declared once: how a causal model runs its decoding steps.

Names and help only, no torch import: the command line and the server's settings build their ``--decode`` flag
from these. `softprompt.engine.static_decode` implements "static" and "compiled".
"""

from __future__ import annotations

from typing import Any

from softprompt.errors import SoftPromptError

DECODE_NAMES = ("eager", "static", "compiled")
#: What `softprompt.load` and `SoftPromptModel` use unless told otherwise (measured in docs/engine.md).
DEFAULT_DECODE = "static"
DECODE_HELP = (
    "How decoding steps run: static (default: a preallocated key/value slot pool, no per-step copies), "
    "compiled (static plus torch.compile of the step; the first steps of each batch shape compile) or eager "
    "(transformers' growing cache)."
)


def check_decode(value: Any, where: str = "decode") -> str:
    """``value`` if it is one of `DECODE_NAMES`, else a `SoftPromptError` naming ``where`` and the choices."""
    if value not in DECODE_NAMES:
        raise SoftPromptError(f"{where}: expected one of {', '.join(DECODE_NAMES)}, got {value!r}")
    return value


class DecodeMode:
    """The validated ``decode`` attribute of `SoftPromptModel` (a data descriptor): setting a name not in
    `DECODE_NAMES` raises one line naming the attribute and the choices."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "decode_mode_" + name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__.get(self.slot, DEFAULT_DECODE)

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self.slot] = check_decode(value)
