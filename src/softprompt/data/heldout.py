"""Training-row fingerprints: what an adapter was trained on, so that evaluation stays held-out.

Every adapter that `softprompt.training.loop` saves carries the fingerprints of its training texts
(``data.train_fingerprints`` in its training state); validation and evaluation drop rows whose text
has one of them. Import it as ``softprompt.data.heldout`` (the ``softprompt.data`` package does not
import it: it reads adapter files, which the data layer itself never needs).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from softprompt.adapters.peft_format import read_training_state

#: The key of the fingerprints in an adapter's training state.
TRAIN_FINGERPRINTS = "data.train_fingerprints"


def fingerprint(text: str) -> int:
    """A 64-bit fingerprint of an example's rendered text (what training data is remembered by)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)


def read_train_fingerprints(adapter_dir: str | Path) -> set[int]:
    """The fingerprints of the texts an adapter was trained on (empty if it was not trained here)."""
    tensors, _ = read_training_state(adapter_dir)
    prints = tensors.get(TRAIN_FINGERPRINTS)
    return set(prints.tolist()) if prints is not None else set()


__all__ = ["TRAIN_FINGERPRINTS", "fingerprint", "read_train_fingerprints"]
