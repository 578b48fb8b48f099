"""Errors that are a user's mistake, not a defect: train.py prints their one-line message (which
names the file, line or key) and exits with a documented code, without a traceback."""
from __future__ import annotations


class DataError(ValueError):
    """A data or annotation file cannot be used as given (missing, unparsable, matching no file).
    The message names the path (and line where known). Exit code 2, as a bad configuration."""


class DataResumeError(ValueError):
    """A saved data position cannot be continued in this run's data (another seed, global batch,
    shuffle buffer, or, unless `--data-resume approx`, other shards). The message names every
    difference. The engine reports it as a checkpoint that cannot be resumed (exit code 3)."""
