"""``python -m lens <command> ...``: the same as the ``lens`` console script."""

from lens.cli import main

main()
