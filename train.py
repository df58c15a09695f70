"""``python train.py --config configs/default.yaml key=value ...``: the same as ``lens train ...``.

Kept as the thin entry point the project layout promises; everything lives in ``lens.cli``.
"""

import sys

from lens.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
