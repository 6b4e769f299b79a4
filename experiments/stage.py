"""The thin script every MLproject entry point calls: the `cifake` command, run from the project folder.

Usage:
    python experiments/stage.py train --config experiments/default.yaml --epochs 8
    python experiments/stage.py promote --version 3
"""

import sys

from cifake_core.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
