"""Exit codes of ``lungvit``, ``lungvit-app`` and the job process."""

OK = 0  # done
SOME_FAILED = 1  # some inputs could not be processed (each failure reported)
USAGE = 2  # a usage error (argparse, or options that cannot go together)
ERROR = 3  # a model, store or configuration problem stopped the command
INTERRUPTED = 130  # Ctrl-C

# A command that ran a fine-tune job (`lungvit train --workers N`, `lungvit runs resume
# --wait`, the job process) exits with OK when the job succeeded, else:
JOB_FAILED = ERROR  # the job failed (`lungvit runs show ID` has its error)
JOB_STOPPED = 1  # the job was cancelled or interrupted


def of_job(status: str) -> int:
    """The exit code of a command that ran a job until it ended with ``status`` (a
    :class:`~lungvit.training.store.JobStatus`): OK, JOB_FAILED or JOB_STOPPED."""
    return {"succeeded": OK, "failed": JOB_FAILED}.get(str(status), JOB_STOPPED)
