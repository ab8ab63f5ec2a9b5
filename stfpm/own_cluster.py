"""Every worker of a Ray that stfpm starts or joins knows its own cluster (RAY_ADDRESS).

Ray Train 2.60 starts a detached PlacementGroupCleaner per run that asks the state API once
a second whether the run's controller is alive (ray/train/v2/_internal/execution/controller/
placement_group_cleaner.py, `_monitor_loop`) and removes the run's placement group when the
answer is "no such actor" (`is_actor_alive` in ray/train/v2/_internal/state/util.py takes a
missing actor for a dead one). It asks with no address, so the state API client
(ray/dashboard/utils.py, `get_address_for_submission_client`) takes RAY_ADDRESS, else the
cluster the machine last advertised in /tmp/ray/ray_current_cluster (written by `ray start`
and by `ray.cluster_utils.Cluster`, ray/_private/services.py
`get_ray_address_from_environment`): on a machine running another Ray that is another
cluster, which has never heard of our controller. The cleaner then removes a healthy run's
placement group and the run fails with "A worker health check failed ... placement group
was removed". With RAY_ADDRESS set in every worker, the question goes to our own cluster."""
from __future__ import annotations

import os

SETUP_HOOK = f"{__name__}.pin_to_own_cluster"


def pin_to_own_cluster() -> None:
    """Ray's worker_process_setup_hook (it runs in each worker process once it is connected)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def with_own_cluster_hook(runtime_env: dict | None) -> dict:
    """The job's runtime_env for ray.init, with the hook that pins its workers to the cluster."""
    return {**(runtime_env or {}), "worker_process_setup_hook": SETUP_HOOK}
