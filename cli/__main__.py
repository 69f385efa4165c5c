"""``python -m lungvit.cli``: the ``lungvit`` command."""
import sys

from lungvit.cli.main import main

sys.exit(main())
