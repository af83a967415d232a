"""Which swarm nodes count as lost: the decision, against node lists as the manager gives them."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.backends import swarm
from runtime.backends.swarm import NodeStates


class Nodes:
    """What ``DockerClient.nodes`` answers: a list of nodes with their status, or an error."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states, self.calls, self.error = states, 0, None

    def list(self) -> list:
        self.calls += 1
        if self.error:
            raise self.error
        return [SimpleNamespace(id=i, attrs={"Status": {"State": s}}) for i, s in self.states.items()]


def states(**nodes: str) -> tuple[NodeStates, Nodes]:
    listing = Nodes(nodes)
    return NodeStates(SimpleNamespace(nodes=listing)), listing


def test_only_a_node_marked_down_or_gone_loses_its_workers():
    view, _ = states(a="ready", b="down", c="disconnected")
    assert view.down("b") and view.down("left-the-swarm")
    assert not view.down("a") and not view.down("c"), "a disconnected node is looking for its manager"
    assert not view.down(None) and not view.down("")


def test_many_askers_share_one_listing_per_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(swarm.time, "monotonic", lambda: clock[0])
    view, listing = states(a="ready")
    for _ in range(50):
        view.down("a")
    assert listing.calls == 1
    listing.states["a"] = "down"
    clock[0] += swarm.NODE_CHECK_S
    assert view.down("a") and listing.calls == 2


def test_an_unreadable_manager_keeps_the_last_view_and_never_condemns_a_node(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(swarm.time, "monotonic", lambda: clock[0])
    view, listing = states(a="ready")
    listing.error = OSError("connection refused")
    assert not view.down("a"), "no view yet: nothing is lost"
    listing.error = None
    assert not view.down("a")
    listing.error, clock[0] = OSError("connection refused"), clock[0] + 5
    assert not view.down("a"), "the last view stands"
