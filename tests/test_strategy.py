"""The strategy's stage loop on a fake grid: replies, errors and silence, each failure naming its client."""

from __future__ import annotations

from types import SimpleNamespace

from fedge.common import wire
from fedge.server.settings import ServerSettings
from fedge.server.strategy import FedgeAvg


class FakeGrid:
    """Nodes 1..3: node 1 always replies, node 2 replies once then errors, node 3 replies once then goes silent."""

    def __init__(self) -> None:
        self.stage = 0

    def push_messages(self, messages: list) -> list[str]:
        for m in messages:
            m.metadata.message_id = f"s{self.stage}-n{m.metadata.dst_node_id}"
        self.stage += 1
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list:
        out = []
        for mid in ids:
            node = int(mid.rsplit("-n", 1)[1])
            later = not mid.startswith("s0-")
            if later and node == 3:
                continue  # silent: the deadline passes
            error = SimpleNamespace(reason="RoundDeclined: no plan fits") if later and node == 2 else None
            out.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node),
                    content={wire.CLIENT: {wire.Client.NAME: f"client-{node}"}},
                    error=error,
                    has_error=lambda error=error: error is not None,
                )
            )
        return out


def _messages() -> list:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, message_id="")) for n in (1, 2, 3)]


def test_failures_name_the_node_and_its_client():
    strategy, grid = FedgeAvg(ServerSettings(min_clients=1, server_lr=1.0), stage_deadline_s=0.01), FakeGrid()
    replies, failures = strategy._stage(grid, _messages())
    assert len(replies) == 3 and failures == []
    replies, failures = strategy._stage(grid, _messages())
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert {(f.node_id, f.name, f.reason) for f in failures} == {
        (2, "client-2", "RoundDeclined: no plan fits"),
        (3, "client-3", "no reply before the deadline"),
    }
