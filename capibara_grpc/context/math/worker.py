"""The sympy worker: `python -m capibara_grpc.context.math.worker`, one JSON task per line on
stdin, one JSON answer per line on stdout ({"text": ...} or {"refused": ...}).

It is started and, when a task overruns its time, killed by pool.py. It exits on its own when
stdin closes or its parent dies, so it never outlives the service.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time

MEMORY_LIMIT = 1 << 30  # bytes: a huge intermediate result is a MemoryError here, not a swapping host


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from capibara_grpc.context.math import solvers  # imports sympy: the slow part of starting

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            answer = {"text": solvers.run(json.loads(line))}
        except solvers.Refused as refused:
            answer = {"refused": str(refused)}
        # A task that breaks sympy in any way (TypeError, RecursionError, MemoryError,
        # NotImplementedError...) is a refused task; the worker stays up for the next one.
        except Exception as error:  # noqa: BLE001
            answer = {"refused": f"{type(error).__name__}: {error}"[:200]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
