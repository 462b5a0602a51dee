"""Say why a process ended: the signal by name and what it usually means.

`subprocess` reports a process killed by a signal as a negative return code (-4); a person needs
"killed by SIGILL (illegal instruction: ...)" and where to look next.
"""

from __future__ import annotations

import signal

# What each signal usually means for a server process, and the first thing to check.
SIGNAL_MEANINGS = {
    signal.SIGILL: "illegal instruction: the binary uses a CPU instruction this processor lacks "
    "(built for another CPU, e.g. with -march=native); rebuild it with `make rebuild-llama-server`",
    signal.SIGSEGV: "segmentation fault: the program crashed on a bad memory access (a bug, or a corrupt model file)",
    signal.SIGBUS: "bus error: a memory-mapped file changed or was truncated under it (e.g. a model file rewritten "
    "while in use), or the disk is full",
    signal.SIGFPE: "arithmetic fault (e.g. integer division by zero) inside the program",
    signal.SIGABRT: "aborted: a failed assertion or an uncaught exception inside the program (see the end of its log)",
    signal.SIGKILL: "killed outright: by the kernel's out-of-memory killer (see `dmesg`) or by someone's `kill -9`",
    signal.SIGTERM: "asked to stop (SIGTERM) by someone other than capibara",
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGHUP: "its terminal or session went away",
    signal.SIGPIPE: "wrote to a pipe or socket nobody reads",
    signal.SIGXCPU: "exceeded its CPU time limit (ulimit -t)",
    signal.SIGXFSZ: "exceeded its file size limit (ulimit -f)",
}


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int) -> str:
    """'killed by SIGILL (illegal instruction: ...)' or 'exited with status 1'."""
    if returncode < 0:
        number = -returncode
        meaning = SIGNAL_MEANINGS.get(number)
        return f"killed by {signal_name(number)}" + (f" ({meaning})" if meaning else "")
    if returncode > 128 and returncode - 128 in SIGNAL_MEANINGS:
        # A shell or wrapper that reports its child's signal as 128 + n.
        return (
            f"exited with status {returncode} (128 + {signal_name(returncode - 128)}: "
            f"{SIGNAL_MEANINGS[returncode - 128]})"
        )
    return f"exited with status {returncode}"
