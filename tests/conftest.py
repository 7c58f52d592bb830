import sys
from pathlib import Path

import pytest
import torch

# Tests import the tiny-model helpers as a plain module, and the research harnesses (`research`, a
# top-level package of the repository, not installed).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and lose a lot when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
