"""The README's runnable example works and teaches each adapter its own answer."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_python_api_example_runs_and_adapters_learn_their_answers():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("final loss")
    assert float(out[0].split()[-1]) < 1.5
    assert "LabelScores(label='yes'" in out[2] and "LabelScores(label='no'" in out[2].split("), ")[1]
    assert out[3] == "['yes']"  # the saved and reloaded adapter answers as it was trained to
