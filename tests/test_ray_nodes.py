"""``verify --ray`` on a cluster of two nodes, one of which is lost under a file.

A cluster of its own (a head and a second node), so this module cannot share the local
cluster of ``test_ray.py``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from dppo_ckpt.checkpoint import fleet  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parent.parent / "fixtures" / "dppo_quantile_vgs.zip")

pytestmark = pytest.mark.slow


def _check_slowly(path: str, pause: float) -> object:
    time.sleep(pause)
    return fleet._static_task(path, False, fleet.Budgets(), None)


def test_a_lost_nodes_file_is_retried_once_on_another_node():
    if ray.is_initialized():
        pytest.skip("needs a cluster of its own")
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        remote = ray.remote(max_retries=0)(_check_slowly)
        submitted: list[str] = []

        def submit(path: str):
            # The first try lands on the node about to be lost; the retry goes where it may.
            first = not submitted
            submitted.append(path)
            if first:
                return remote.options(resources={"doomed": 0.01}).remote(path, 60.0)
            return remote.remote(path, 0.0)

        killer = threading.Timer(3.0, cluster.remove_node, args=(doomed,))
        killer.start()
        notes: list[str] = []
        reports, died = fleet._gather(ray, [FIXTURE], submit, notes)
        killer.join()
        assert submitted == [FIXTURE, FIXTURE]
        assert died == set()
        assert [r.exit_code for r in reports] == [0]
        assert notes == [f"{FIXTURE}: its Ray node was lost; retried once on another node"]
    finally:
        ray.shutdown()
        cluster.shutdown()
