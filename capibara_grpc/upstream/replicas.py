"""Which of a model's servers (backend.url and backend.replicas, balance: affinity) answers a chat.

llama-server keeps the prompt it last processed in each slot's KV cache and reuses the longest
common prefix: a conversation whose next turn goes to the server that answered the previous one
processes only the new messages, on any other server the whole history again. So:

- A chat's affinity key hashes its messages up to and including the first user message (system
  prompt, first question). It stays the same as the history grows, and needs no conversation id:
  a stateless /v1 client resending the whole history gets the same key every turn.
- A key is pinned to the server that last served it (a bounded LRU). The pinned server answers
  while it is up and has a free slot (fewer chats in flight than its slots); else the least
  loaded server that is up does, and the key is pinned there from then on.
- A server is down while its health probe says so, and for DOWN_FOR_S after a chat could not
  reach it (refused, reset, 503 while loading). With every server down they are all tried.

No I/O and no asyncio in here: the caller counts its chats in and out (begin, end) and reports
health and failures.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Conversations remembered per model (about 100 bytes each).
MAX_PINNED = 10_000
# Seconds a server that refused a chat gets no new one (unless its health probe says it is up).
DOWN_FOR_S = 5.0

AFFINITY, FALLBACK, NEW = "affinity", "fallback", "new"


def affinity_key(messages: Iterable) -> str:
    """A hash of the messages (objects with .role and .content) up to the first user message."""
    digest = hashlib.blake2b(digest_size=12)
    for message in messages:
        digest.update(message.role.encode())
        digest.update(b"\0")
        digest.update((message.content or "").encode())
        digest.update(b"\0")
        if message.role == "user":
            break
    return digest.hexdigest()


@dataclass
class Replica:
    url: str
    slots: int
    in_flight: int = 0
    pinned: int = 0
    healthy: bool = True
    detail: str = "ok"
    refused_until: float = 0.0
    # Chats sent here: to the server the key was pinned to / away from a busy or down pinned
    # server / for a key not pinned yet.
    affinity: int = 0
    fallback: int = 0
    new: int = 0


@dataclass
class Choice:
    index: int
    url: str
    outcome: str  # AFFINITY, FALLBACK or NEW
    at: float = 0.0  # time.time() of the choice


class ReplicaPicker:
    def __init__(
        self,
        urls: list[str],
        slots: int,
        max_pinned: int = MAX_PINNED,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.replicas = [Replica(url, max(1, slots)) for url in urls]
        self.max_pinned = max_pinned
        self.clock = clock
        self.wall_clock = wall_clock
        self._pins: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.last: Choice | None = None
        self._turn = 0  # rotates ties between equally loaded servers

    # -- what the caller reports -------------------------------------------------------------------

    def up(self, index: int) -> bool:
        replica = self.replicas[index]
        return replica.healthy and self.clock() >= replica.refused_until

    def set_health(self, index: int, healthy: bool, detail: str = "ok") -> None:
        """A health probe's verdict; a healthy verdict ends a refusal's DOWN_FOR_S early."""
        replica = self.replicas[index]
        replica.healthy, replica.detail = healthy, detail
        if healthy:
            replica.refused_until = 0.0

    def refused(self, index: int, why: str) -> None:
        """A chat could not reach the server (or it would not take it): none for DOWN_FOR_S."""
        replica = self.replicas[index]
        replica.refused_until = self.clock() + DOWN_FOR_S
        replica.detail = why

    def begin(self, index: int) -> None:
        self.replicas[index].in_flight += 1

    def end(self, index: int) -> None:
        self.replicas[index].in_flight -= 1

    # -- the choice --------------------------------------------------------------------------------

    def choose(self, key: str, exclude: Iterable[int] = ()) -> Choice:
        """The server for a chat with affinity key `key`, not one of `exclude` (servers this chat
        could not reach), while there is another. The key is pinned to it."""
        excluded = set(exclude)
        candidates = [i for i in range(len(self.replicas)) if i not in excluded] or list(range(len(self.replicas)))
        live = [i for i in candidates if self.up(i)] or candidates
        pinned = self._pins.get(key)
        if pinned is not None and pinned in live and not self._busy(pinned, live):
            return self._chose(key, pinned, AFFINITY)
        least = min(live, key=lambda i: (self.replicas[i].in_flight, (i - self._turn) % len(self.replicas)))
        self._turn = (least + 1) % len(self.replicas)
        return self._chose(key, least, NEW if pinned is None else FALLBACK)

    def _busy(self, index: int, live: list[int]) -> bool:
        """Every slot of the server is taken while another live server has a free one."""
        replica = self.replicas[index]
        if replica.in_flight < replica.slots:
            return False
        return any(self.replicas[i].in_flight < self.replicas[i].slots for i in live if i != index)

    def _chose(self, key: str, index: int, outcome: str) -> Choice:
        replica = self.replicas[index]
        setattr(replica, outcome, getattr(replica, outcome) + 1)
        previous = self._pins.pop(key, None)
        if previous is not None:
            self.replicas[previous].pinned -= 1
        self._pins[key] = index
        replica.pinned += 1
        while len(self._pins) > self.max_pinned:
            _, evicted = self._pins.popitem(last=False)
            self.replicas[evicted].pinned -= 1
        self.last = Choice(index, replica.url, outcome, self.wall_clock())
        return self.last

    # -- what the status page shows ----------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        return [
            {
                "url": r.url,
                "up": self.up(i),
                "detail": r.detail,
                "slots": r.slots,
                "in_flight": r.in_flight,
                "pinned": r.pinned,
                "affinity": r.affinity,
                "fallback": r.fallback,
                "new": r.new,
            }
            for i, r in enumerate(self.replicas)
        ]
