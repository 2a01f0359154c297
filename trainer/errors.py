"""User-facing errors: printed as one line by the entry point, exit code 2, no traceback."""


class UserError(Exception):
    """Base class for mistakes a user can fix (config, data, checkpoint)."""


class ConfigError(UserError, ValueError):
    """A bad configuration value, raised before any process group is created."""


class DataError(UserError):
    """Missing or corrupt data / tokenizer files; the message names the path."""


class CheckpointError(UserError):
    """Missing, incomplete, corrupt or incompatible checkpoint; the message names the path."""


def report_user_error(e: BaseException) -> None:
    """Print ``error: <e>`` once per job, not once per rank.

    Single process: always. Under a launcher (WORLD_SIZE > 1) the first rank of this node
    that reports that exact message prints it (a marker file per launcher run id in the
    temp directory); not "rank 0 only": the launcher kills the other ranks as soon as one
    exits, so rank 0 may never get to print. An error only some ranks see is still printed.
    """
    import hashlib
    import os
    import sys
    import tempfile

    msg = f"error: {e}"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "")
        marker_dir = os.path.join(tempfile.gettempdir(), f"moefold-errors-{os.getuid()}")
        digest = hashlib.sha1(f"{run_id}\0{msg}".encode()).hexdigest()[:20]
        try:
            os.makedirs(marker_dir, exist_ok=True)
            os.close(os.open(os.path.join(marker_dir, digest),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another rank printed it
        except OSError:
            pass  # no temp dir: print rather than stay silent
    print(msg, file=sys.stderr, flush=True)
