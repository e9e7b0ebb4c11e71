"""User-facing errors: one line that says what went wrong and what to do, exit code 2."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# A full disk, and a full quota, which the user frees the same way.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """An error caused by input the user can fix (unknown model, missing file, bad layer...).

    Command-line entry points print ``str(error)`` on one line and exit with status 2; they never show a traceback
    for these.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class MissingWeights(UserError):
    """No trained checkpoint of a model the project trains itself (the demo models): an orchestrator that may train
    (compute.all, compute.suite) answers it by training; a model loader never trains."""

    def __init__(self, message: str, model: str, seed: int):
        super().__init__(message)
        self.model, self.seed = model, seed


class StageSkipped(Exception):
    """A stage that cannot run with what this run has (e.g. dissection without concept data); the rest goes on."""


def no_space_left(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, is a full disk (or quota).

    Python says so in ``OSError.errno``; h5py passes HDF5's report of the failed write on as an OSError or a
    RuntimeError whose text carries the C library's ``errno = 28``.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if re.search(r"\berrno = (%s)\b" % "|".join(map(str, NO_SPACE)), str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def full_device(error: BaseException, fallback: Path | str | None = None) -> str:
    """The mount point of the file whose write failed (from the error, else ``fallback``), as the user sees it."""
    path = getattr(error, "filename", None)
    if not path:
        found = re.search(r"filename = '([^']+)'", str(error))
        path = found.group(1) if found else fallback
    if not path:
        return "the device"
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def disk_full(error: BaseException, writing: str, fallback: Path | str | None = None) -> UserError:
    """The one line for a run stopped by a full disk: finished stages are kept, so the same command resumes."""
    return UserError(f"no space left on {full_device(error, fallback)} while writing {writing}: free space and rerun "
                     f"the same command to resume")


def run_cli(main, argv=None) -> int:
    """Call ``main(argv)``; turn a UserError (or a full disk) into a one-line message on stderr and exit code 2."""
    import sys

    try:
        result = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if not no_space_left(error):
            raise
        print(f"error: no space left on {full_device(error)}: free space and rerun the same command", file=sys.stderr)
        return UserError.exit_code
    return int(result or 0)
