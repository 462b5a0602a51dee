"""The replica picker on its own (capibara_grpc/upstream/replicas.py): a conversation stays on the
server that served it, moves when that one is busy or down, and the figures say what happened."""

from __future__ import annotations

from capibara_grpc.chat.types import Message
from capibara_grpc.upstream.replicas import AFFINITY, DOWN_FOR_S, FALLBACK, NEW, ReplicaPicker, affinity_key

A, B, C = "http://127.0.0.1:7080", "http://127.0.0.1:7081", "http://127.0.0.1:7082"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def picker(urls=(A, B), slots: int = 2, **kwargs) -> tuple[ReplicaPicker, Clock]:
    clock = Clock()
    return ReplicaPicker(list(urls), slots, clock=clock, wall_clock=clock, **kwargs), clock


def conversation(first: str, turns: int) -> list[Message]:
    messages = [Message("system", "You are Capibara."), Message("user", first)]
    for turn in range(turns):
        messages += [Message("assistant", f"answer {turn}"), Message("user", f"question {turn}")]
    return messages


def test_the_key_stays_the_same_as_the_history_grows():
    assert affinity_key(conversation("hola", 0)) == affinity_key(conversation("hola", 5))


def test_the_key_differs_by_first_question_and_system_prompt():
    assert affinity_key(conversation("hola", 2)) != affinity_key(conversation("adiós", 2))
    other_system = [Message("system", "You are someone else."), *conversation("hola", 2)[1:]]
    assert affinity_key(other_system) != affinity_key(conversation("hola", 2))


def test_a_conversation_returns_to_the_server_that_served_it():
    p, _ = picker()
    first = p.choose("k1")
    assert first.outcome == NEW
    for _ in range(5):
        assert p.choose("k1").url == first.url
    assert p.last.outcome == AFFINITY
    assert [r["affinity"] for r in p.snapshot()][first.index] == 5


def test_new_conversations_spread_over_the_least_loaded_servers():
    p, _ = picker()
    a = p.choose("k1")
    p.begin(a.index)
    b = p.choose("k2")
    assert b.index != a.index and b.outcome == NEW
    p.end(a.index)
    # Equally loaded: ties rotate rather than always picking the first server.
    assert {p.choose(f"n{i}").index for i in range(4)} == {0, 1}


def test_a_busy_server_sends_the_conversation_to_a_free_one_and_the_pin_follows():
    p, _ = picker(slots=1)
    home = p.choose("k1").index
    p.begin(home)  # its only slot is taken
    moved = p.choose("k1")
    assert moved.index != home and moved.outcome == FALLBACK
    p.end(home)
    assert p.choose("k1").index == moved.index  # remembered where it went
    snapshot = p.snapshot()
    assert snapshot[moved.index]["pinned"] == 1 and snapshot[home]["pinned"] == 0


def test_when_every_server_is_full_the_conversation_stays_home():
    p, _ = picker(slots=1)
    home = p.choose("k1").index
    for i in range(2):
        p.begin(i)
    assert p.choose("k1").index == home
    assert p.last.outcome == AFFINITY


def test_a_server_that_refused_gets_nothing_for_a_while_then_is_tried_again():
    p, clock = picker()
    home = p.choose("k1").index
    p.refused(home, "unreachable")
    assert p.choose("k1").index != home and p.last.outcome == FALLBACK
    assert p.snapshot()[home]["up"] is False
    clock.now += DOWN_FOR_S + 0.1
    assert p.snapshot()[home]["up"] is True
    assert p.choose("k2").index == home  # least loaded again, ties rotate to it


def test_a_healthy_probe_ends_a_refusal_early_and_an_unhealthy_one_takes_the_server_out():
    p, _ = picker()
    p.refused(0, "unreachable")
    p.set_health(0, True)
    assert p.up(0)
    p.set_health(1, False, "loading model")
    assert {p.choose(f"k{i}").index for i in range(4)} == {0}
    assert p.snapshot()[1]["detail"] == "loading model"


def test_excluded_servers_are_skipped_unless_none_is_left():
    p, _ = picker((A, B, C))
    assert p.choose("k1", exclude={0, 1}).index == 2
    assert p.choose("k2", exclude={0, 1, 2}).url in {A, B, C}


def test_with_every_server_down_they_are_all_still_tried():
    p, _ = picker()
    p.set_health(0, False, "down")
    p.set_health(1, False, "down")
    assert p.choose("k1").url in {A, B}


def test_the_memory_of_conversations_is_bounded_and_forgets_the_oldest():
    p, _ = picker(max_pinned=3)
    for i in range(5):
        p.choose(f"k{i}")
    assert sum(r["pinned"] for r in p.snapshot()) == 3
    assert p.choose("k0").outcome == NEW  # forgotten
    assert p.choose("k4").outcome == AFFINITY


def test_the_last_choice_is_kept():
    p, clock = picker()
    choice = p.choose("k1")
    assert p.last == choice and choice.at == clock.now
