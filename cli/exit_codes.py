"""Exit codes of ``lungvit`` and ``lungvit-app``."""

OK = 0  # done
SOME_FAILED = 1  # some inputs could not be processed (each failure reported)
USAGE = 2  # a usage error (argparse, or options that cannot go together)
ERROR = 3  # a model, store or configuration problem stopped the command
INTERRUPTED = 130  # Ctrl-C
