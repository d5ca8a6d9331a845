"""One kind of error for bad user input, and the wrapper that turns it, or a fault of the system (a full disk, a
missing permission, a kill), into one clear line.

Exit codes: 2 bad input, 1 a fault of the system (OSError), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""
import errno
import signal
import sys


class UserError(Exception):
    """A problem the user can fix: the message names it and says how."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a sweep stopping, a scheduler's kill), raised so that every `finally` still cleans up."""


OS_HINTS = {
    errno.ENOSPC: "no space left on the device: free some space (or write the record to another disk) and run the "
                  "command again; nothing was left half-written",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the command again",
    errno.EACCES: "permission denied: change the permissions of that path or choose another place",
    errno.EPERM: "operation not permitted: change the permissions of that path or choose another place",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another name",
    errno.EISDIR: "that path is a folder where a file is expected: choose another name",
    errno.EEXIST: "that path is in the way: move it away or choose another name",
    errno.ENOENT: "that path does not exist: check the name",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
}


def os_error_message(e: OSError) -> str:
    """'<what> at <path>: <the way out>' for an OSError."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    hint = OS_HINTS.get(e.errno, f"{e.strerror or e}: check that path and run the command again")
    return f"{where}: {hint}" if where else hint


def _terminate(signum, frame):
    raise Terminated()


def run_main(main, argv=None):
    """Run a script's main(); bad input and faults end with one message, never a traceback."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print("\nterminated: the same command with --resume continues from the last epoch's checkpoint",
              file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("\ninterrupted: the same command with --resume continues from the last epoch's checkpoint "
              "(a run stopped inside its first epoch left nothing and simply starts again)", file=sys.stderr)
        sys.exit(130)
