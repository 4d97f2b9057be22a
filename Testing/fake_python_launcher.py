"""Stand-in for Slicer's ``PythonSlicer`` launcher: starts the real Python as its child and waits.

``python fake_python_launcher.py ARGS...`` runs ``sys.executable ARGS...`` as a child process that
inherits stdout, stderr and the environment, waits for it and exits with its exit code (1 when
the child is killed by a signal, as the CTK application launcher reports a crash). The worker's
parent process is then this launcher, not the application that started it, as inside Slicer.

The child's stdin follows ``FAKE_LAUNCHER_STDIN``: ``inherit`` (default: the launcher's stdin is
forwarded), ``pipe`` (a pipe the launcher holds and never writes to, as a launcher that does not
forward stdin) or ``devnull`` (end-of-file at once).
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> int:
    """Run the child, wait for it, return its exit code."""
    mode = os.environ.get("FAKE_LAUNCHER_STDIN", "inherit")
    stdin = {"inherit": None, "pipe": subprocess.PIPE, "devnull": subprocess.DEVNULL}[mode]
    code = subprocess.Popen([sys.executable, *argv], stdin=stdin).wait()
    if code < 0:
        print(f"error: [{sys.executable}] exit abnormally - Report the problem.", file=sys.stderr, flush=True)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
