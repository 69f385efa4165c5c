"""The ``lungvit`` command line: one dispatcher (:mod:`lungvit.cli.main`), one module per
command, the exit codes every command and ``lungvit-app`` share
(:mod:`lungvit.cli.exit_codes`), and the job process that runs one fine-tune job
(:mod:`lungvit.cli.job_process`, started by :mod:`lungvit.training.jobs.runner`).

Command modules import only argparse and light helpers at module level (the dispatcher
imports them all on every start); torch, Lightning, Ray and the store load when a command
runs.
"""
