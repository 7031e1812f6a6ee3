"""The loopback deployment used by notebook 05: keys, server, SSH way in, edge, all real."""

from __future__ import annotations

import pytest
from qa_fixtures import save_tiny_artifact, write_tiny_bundle

from elma_utils.bench.loopback import LoopbackDeployment

pytestmark = pytest.mark.network


@pytest.mark.parametrize("way_in", ["endpoint", "sshd"])
def test_a_whole_deployment_answers_and_measures(way_in, tmp_path, minilm_tokenizer, dev_v11):
    model = save_tiny_artifact(tmp_path / "model", minilm_tokenizer)
    bundle = write_tiny_bundle(tmp_path / "bundle", minilm_tokenizer, -1.0)  # always offloads
    with LoopbackDeployment(model, bundle, tmp_path / "work", way_in=way_in) as dep:
        results = [dep.edge.answer(e.question, e.context) for e in dev_v11.examples[:3]]
        rtt = dep.round_trips(lines=20, new_connection_lines=3)
        stats = dep.server.store.stats()
    assert [r.source for r in results] == ["server"] * 3
    assert stats.offloads == 3
    assert set(rtt) == {"ssh_persistent", "ssh_channel_per_line", "ssh_connection_per_line", "plain_tcp"}
    assert all(r["p50_ms"] > 0 and r["wire_bytes_per_line"] > 0 for r in rtt.values())
    # keeping the connection open is what makes SSH cheap: a new connection costs a handshake
    assert (
        rtt["ssh_connection_per_line"]["wire_bytes_per_line"]
        > 5 * rtt["ssh_persistent"]["wire_bytes_per_line"]
    )
    assert (tmp_path / "work" / "keys" / "known_hosts").read_text().startswith("[127.0.0.1]:")


def test_unknown_way_in_is_refused(tmp_path):
    with pytest.raises(ValueError, match="way_in"):
        LoopbackDeployment(tmp_path, tmp_path, tmp_path, way_in="telnet")
