import sys
from pathlib import Path

# Tests import the tiny-model helpers as a plain module.
sys.path.insert(0, str(Path(__file__).parent))
