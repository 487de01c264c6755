"""A node removed from a multi-node ``ray.cluster_utils.Cluster``: its streams move to the other node."""

import json
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from orchestrator.actor import start_orchestrator
from tests.orchestrator.test_recovery import check_outputs, events, make_run, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    assert not ray.is_initialized()
    # one GeneratorWorker (1 CPU) fits on each non-head node
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_node_removed_its_streams_move_to_the_other_node(cluster, tmp_path):
    c, nodes = cluster
    spec = make_run(tmp_path / "run", n_streams=3, chunks=12, seed=30)
    orch = start_orchestrator(spec.out_dir)
    try:
        p = wait_for(orch, lambda p: len(p.workers) == 2 and min(s.next_chunk for s in p.streams) >= 5,
                     what="every stream past chunk 5")
        by_node = {w.node_id: w for w in p.workers}
        assert len(by_node) == 2, "the two workers should sit on different nodes"
        # a num_cpus=0 actor may be placed on any node: remove one the orchestrator does not live on (removing
        # its own node restarts it, and its next incarnation starts a fresh list of recoveries)
        home = ray.get(orch.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        lost = next(n for n in nodes if n.node_id in by_node and n.node_id != home)
        victim, survivor = by_node[lost.node_id], next(w for w in p.workers if w.node_id != lost.node_id)
        t0 = time.time()
        c.remove_node(lost)
        p = wait_for(orch, lambda p: p.state == "done", what="run done after node loss")
    finally:
        ray.kill(orch, no_restart=True)
    assert [r.worker_id for r in p.recoveries] == [victim.worker_id]
    assert p.recoveries[0].resumed_at is not None and p.recoveries[0].resumed_at > t0
    moved = [e for e in events(tmp_path / "run") if e["event"] == "stream.assigned" and e["time"] > t0]
    assert {e["stream_id"] for e in moved} == set(victim.stream_ids)
    assert {e["worker_id"] for e in moved} == {survivor.worker_id}  # no CPU left for a replacement
    check_outputs(spec, tmp_path)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "done"
