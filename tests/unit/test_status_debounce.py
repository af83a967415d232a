"""What a pool hears of its worker's status answers (actors/status_debounce.py): pure."""

from __future__ import annotations

from actors.status_debounce import Debounce
from agent.contract import Milestones

IDLE = {"registered": True, "state": "idle", "lease_id": None}
STARTING = {"registered": False, "state": "starting"}

NOTHING = Milestones()  # no session yet


def test_nothing_is_told_before_the_worker_first_registers():
    d = Debounce(resend_s=2, silent_probes=3)
    assert d.heard(STARTING, 0.0) is None and d.heard(None, 0.1) is None and d.heard(STARTING, 5.0) is None
    assert d.heard(IDLE, 5.1) == (True, "idle", None, NOTHING)


def test_a_change_is_told_at_once_and_the_same_status_again_only_every_resend_s():
    d = Debounce(resend_s=2, silent_probes=3)
    assert d.heard(IDLE, 10.0) is not None
    assert d.heard(IDLE, 11.0) is None  # unchanged, and told 1 s ago
    assert d.heard({**IDLE, "state": "claimed", "lease_id": "L1"}, 11.5) == (True, "claimed", "L1", NOTHING)
    assert d.heard({**IDLE, "state": "claimed", "lease_id": "L1"}, 13.4) is None
    assert d.heard({**IDLE, "state": "claimed", "lease_id": "L1"}, 13.5) == (True, "claimed", "L1", NOTHING)  # resent


def test_a_registered_worker_that_stops_answering_counts_as_starting_after_silent_probes():
    d = Debounce(resend_s=2, silent_probes=3)
    d.heard(IDLE, 0.0)
    assert d.heard(None, 0.1) is None and d.heard(None, 0.2) is None
    assert d.heard(None, 0.3) == (False, "starting", None, NOTHING)  # hung, or gone: never idle
    assert d.heard(IDLE, 0.4) == (True, "idle", None, NOTHING)  # back: told at once


def test_a_session_milestone_is_told_at_once():
    d = Debounce(resend_s=5.0, silent_probes=3)
    busy = {**IDLE, "state": "busy", "lease_id": "L1"}
    d.heard(busy, 0.0)
    assert d.heard({**busy, "in_room": True}, 0.1) == (True, "busy", "L1", Milestones(in_room=True))
    ended = {**busy, "in_room": True, "end_cause": "no_show"}
    assert d.heard(ended, 0.2) == (True, "busy", "L1", Milestones(True, False, "no_show"))
