"""When a voice session's input counts as dead (agent.hearing.Hearing): pure, in ms."""

from __future__ import annotations

from agent.hearing import Hearing


def test_frames_keep_it_alive_and_a_silence_of_deaf_s_asks_for_a_recovery_once():
    h = Hearing(5.0)
    assert h.check(0.0, expecting=True) == "ok"  # audio expected from now on
    h.frame(3.0)
    assert h.check(7.9, expecting=True) == "ok"
    assert h.check(8.0, expecting=True) == "recover"
    assert h.check(9.0, expecting=True) == "ok"  # recovering: give it time


def test_no_frame_after_the_recovery_ends_it_and_a_frame_clears_it():
    h = Hearing(5.0)
    h.check(0.0, expecting=True)
    assert h.check(5.0, expecting=True) == "recover"
    assert h.check(9.9, expecting=True) == "ok"
    assert h.check(10.0, expecting=True) == "give up"
    g = Hearing(5.0)
    g.check(0.0, expecting=True)
    g.check(5.0, expecting=True)
    g.frame(6.0)  # the recovery worked
    assert g.check(10.5, expecting=True) == "ok"
    assert g.check(11.0, expecting=True) == "recover"  # a new silence is a new recovery, not the end


def test_nothing_is_owed_while_no_microphone_is_published_or_the_agent_is_away():
    h = Hearing(5.0)
    assert h.check(0.0, expecting=False) == "ok"
    assert h.check(100.0, expecting=False) == "ok"
    assert h.check(101.0, expecting=True) == "ok"  # the clock starts when audio is owed
    assert h.check(105.9, expecting=True) == "ok"
    assert h.check(106.0, expecting=True) == "recover"
    assert h.check(107.0, expecting=False) == "ok"  # the agent reconnecting: no verdict
    assert h.check(108.0, expecting=True) == "ok"  # back: a whole new window
