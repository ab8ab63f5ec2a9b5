"""A Ray Train run on a machine that advertises another Ray keeps its placement group
(stfpm.own_cluster): a real second cluster with a dashboard, a real run."""
import socket
import time

import pytest
import ray
import ray.train
from ray.cluster_utils import Cluster
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from stfpm.noise import init_ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def advertised_foreign_cluster(private_ray_tmpdir):
    """Another Ray advertised as the machine's current cluster, in a private RAY_TMPDIR so that
    no other process on the machine is pointed at it; our Ray, started after, inherits the
    variable, so its workers read that advertisement. Its dashboard (the state API) gets a
    free port: on Ray's default one, taken by any other Ray, it would not start, and nothing
    could answer "no such actor"."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": _free_port()})
    yield cluster
    cluster.shutdown()


def test_a_train_run_keeps_its_placement_group_while_another_ray_is_advertised(advertised_foreign_cluster,
                                                                                tmp_path):
    """Without the pin, Ray Train's placement-group cleaner asks the advertised cluster whether
    our controller lives, hears "no such actor" and removes our placement group within
    seconds, and the run fails ("... its placement group was removed"). 20 one-second steps
    give the cleaner about 20 chances."""
    def report_every_second(config: dict) -> None:  # nested: pickled by value for the worker
        for step in range(config["steps"]):
            time.sleep(1)
            ray.train.report({"step": step})

    assert advertised_foreign_cluster.webui_url, "the advertised cluster has no state API to ask"
    init_ray(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = DataParallelTrainer(
            report_every_second, train_loop_config={"steps": 20},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name="pinned", storage_path=str(tmp_path))).fit()
    finally:
        ray.shutdown()
    assert result.error is None
