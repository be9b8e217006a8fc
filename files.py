"""
Files in and out, for every script: a bad file or flag is one line that names it and the fix.
It imports nothing of the project, so any file can use it.

    UserError        a problem with what the user gave (a flag, a file); the scripts print its
                     message as one line, `error: ...`, and exit with status 2 (run_main)
"""
import sys


class UserError(ValueError):
    """Bad input a person can fix: a flag's value, a file's content. The message is one line
    that names the flag or file, the value and the fix. Every other exception is a bug in this
    code and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A file, folder or model that is not where the user said (or not reachable offline)."""


def run_main(main):
    """A script's entry point: runs main(); a UserError becomes `error: <message>` on stderr and
    exit status 2 (argparse's status for bad flags), without a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

