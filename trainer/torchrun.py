"""``python -m trainer.torchrun <torchrun arguments>``: torchrun, minus the wall of text
after a user error.

When every failed rank exited with 2 (moefold's user-error exit code: the one-line
``error:`` was already printed, once per job), the launcher's ``ChildFailedError`` report
and its "failed (exitcode: 2)" log lines are dropped and the launcher exits 2. Any other
failure (a crash, a signal, an out-of-memory kill) is reported by torchrun as usual.
"""

from __future__ import annotations

import logging
import sys

USER_ERROR_EXIT = 2


class _DropUserErrorExits(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"exitcode: {USER_ERROR_EXIT})" not in record.getMessage()


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet = _DropUserErrorExits()
    for name in ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(quiet)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        # the ranks the launcher stopped after the first exit show SIGTERM (-15)
        if USER_ERROR_EXIT in codes and codes <= {USER_ERROR_EXIT, -15}:
            sys.exit(USER_ERROR_EXIT)
        raise


if __name__ == "__main__":
    main()
