"""One kind of error for bad user input, and the wrapper that turns it into one clear line."""
import sys


class UserError(Exception):
    """A problem the user can fix: the message names it and says how."""


def run_main(main, argv=None):
    """Run a script's main(); bad input ends with one message and exit code 2, never a traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the same command with --resume continues from the last epoch's checkpoint "
              "(a run stopped inside its first epoch left nothing and simply starts again)", file=sys.stderr)
        sys.exit(130)
