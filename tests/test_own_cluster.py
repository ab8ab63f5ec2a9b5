"""A Ray Train run on a machine that advertises another Ray keeps its placement group
(stfpm.distributed.own_cluster): a real second cluster with a dashboard, a real run."""
import time

import pytest
import ray
import ray.train
from ray.cluster_utils import Cluster
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from stfpm.noise import init_ray


def _report_for(config: dict) -> None:
    for step in range(config["steps"]):
        time.sleep(1)
        ray.train.report({"step": step})


@pytest.fixture
def advertised_foreign_cluster(private_ray_tmpdir):
    """Another Ray (with the state API) advertised as the machine's current cluster, in a
    private RAY_TMPDIR so that no other process on the machine is pointed at it; our Ray,
    started after, inherits the variable, so its workers read that advertisement."""
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    yield cluster
    cluster.shutdown()


def test_a_train_run_keeps_its_placement_group_while_another_ray_is_advertised(advertised_foreign_cluster,
                                                                                tmp_path):
    """Without the pin, Ray Train's placement-group cleaner asks the advertised cluster whether
    our controller lives, hears "no such actor" and removes our placement group within
    seconds: the run fails with "A worker health check failed". 20 one-second steps give
    the cleaner about 20 chances."""
    init_ray(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = DataParallelTrainer(
            _report_for, train_loop_config={"steps": 20},
            scaling_config=ray.train.ScalingConfig(num_workers=1),
            run_config=ray.train.RunConfig(name="pinned", storage_path=str(tmp_path))).fit()
    finally:
        ray.shutdown()
    assert result.error is None
