"""``python -m fuzz TARGET --runs N``: see fuzz/__init__.py and fuzz/run.py."""

import sys

from fuzz.run import main

sys.exit(main(sys.argv[1:]))
