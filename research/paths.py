"""Where research reads and writes: its own folders only, never the product's.

Research runs write under ``runs/`` (not in the repository) and, for the numbers the docs quote,
``research/results/``. ``docs/`` and ``examples/`` belong to the product: a research command that is
given a path there refuses it. Shipping an adapter as an example is the one explicit step that writes
into the product, ``python -m research.export RESULT --into examples/adapters``.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # the shared data sets, read in place
RESULTS = REPO / "research" / "results"  # research's committed output: the numbers the docs quote
EXAMPLES = (
    REPO / "examples" / "adapters"
)  # the shipped examples: read to compare, written only by research.export --into
PRODUCT = (REPO / "docs", REPO / "examples", REPO / "src", REPO / "results")


def own_output(path: str | Path, flag: str, program: str) -> Path:
    """``path`` if it is not inside the product's folders, else one clear error naming ``flag``."""
    resolved = Path(path).resolve()
    for folder in PRODUCT:
        if resolved == folder or resolved.is_relative_to(folder):
            raise SystemExit(
                f"{program}: {flag}: {path} is inside {folder.relative_to(REPO)}/, which belongs to the "
                f"product; research writes under runs/ or research/results/ (ship an adapter with "
                f"`python -m research.export RESULT --into examples/adapters`)"
            )
    return Path(path)
