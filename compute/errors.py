"""User-facing errors: one line that says what went wrong and what to do, exit code 2."""


class UserError(Exception):
    """An error caused by input the user can fix (unknown model, missing file, bad layer...).

    Command-line entry points print ``str(error)`` on one line and exit with status 2; they never show a traceback
    for these.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class StageSkipped(Exception):
    """A stage that cannot run with what this run has (e.g. dissection without concept data); the rest goes on."""


def run_cli(main, argv=None) -> int:
    """Call ``main(argv)``; turn a UserError into a one-line message on stderr and exit code 2."""
    import sys

    try:
        result = main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)
