"""The restart policy of `capibara up`, as a pure, clock-free core (the asyncio watcher that applies
it lives in the launcher).

Like systemd's Restart=on-failure: a process that dies is started again after a delay that starts
at `backoff_initial_s` and doubles with every death in a row, up to `backoff_max_s`. A process that
stays up `stable_after_s` is healthy again: the next death starts from the first delay. A process
that dies `give_up_after` times in a row, each time within `stable_after_s` of being started, is
given up on (it will not start: a bad flag, a corrupt model file, a port taken by someone else).
"""

from __future__ import annotations

from dataclasses import dataclass

from capibara_grpc.config import SupervisionConfig

RESTART, GIVE_UP, LEAVE = "restart", "give_up", "leave"


@dataclass(frozen=True)
class Decision:
    """What to do about one death. `attempt` numbers the restarts since the process last ran
    stably (1 = the first); `quick_failures` counts the deaths in a row that each came within
    stable_after_s of a start (give up at give_up_after)."""

    action: str  # RESTART, GIVE_UP, or LEAVE (the policy does not restart this exit)
    delay_s: float = 0.0
    attempt: int = 0
    quick_failures: int = 0
    reason: str = ""


def backoff_delays(policy: SupervisionConfig, count: int) -> list[float]:
    """The first `count` restart delays of a process that keeps dying."""
    return [min(policy.backoff_initial_s * 2**n, policy.backoff_max_s) for n in range(count)]


def restarts_exit(policy: SupervisionConfig, returncode: int) -> bool:
    """Whether the policy restarts a process that ended with `returncode` (negative: a signal)."""
    if policy.restart == "always":
        return True
    if policy.restart == "on-failure":
        return returncode != 0
    return False


class RestartTracker:
    """The restart state of one supervised process. Feed it every death with how long the process
    had run; it answers with a Decision. No clock, no processes: the caller measures uptime."""

    def __init__(self, policy: SupervisionConfig):
        self.policy = policy
        self.attempt = 0  # deaths since the last stable run (the restart number of the next restart)
        self.quick_failures = 0  # deaths in a row within stable_after_s of their start
        self.given_up = False

    def on_exit(self, returncode: int, uptime_s: float) -> Decision:
        policy = self.policy
        if uptime_s >= policy.stable_after_s:
            # It ran long enough to count as working: this death starts a new series.
            self.attempt = 0
            self.quick_failures = 0
        else:
            self.quick_failures += 1
        if not restarts_exit(policy, returncode):
            why = (
                "supervision.restart: no"
                if policy.restart == "no"
                else "it exited cleanly, and supervision.restart is on-failure"
            )
            return Decision(LEAVE, quick_failures=self.quick_failures, reason=why)
        if policy.give_up_after and self.quick_failures >= policy.give_up_after:
            self.given_up = True
            return Decision(
                GIVE_UP,
                attempt=self.attempt,
                quick_failures=self.quick_failures,
                reason=f"{self.quick_failures} starts in a row each died within "
                f"{policy.stable_after_s:g} s of starting",
            )
        self.attempt += 1
        delay = backoff_delays(policy, self.attempt)[-1]
        return Decision(RESTART, delay_s=delay, attempt=self.attempt, quick_failures=self.quick_failures)
