import sys
from pathlib import Path

# Tests import the scripts (`import collectives`) and the harness (`from harness import run_distributed`).
ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
