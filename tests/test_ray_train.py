"""Data-parallel training on a real local Ray: the Paddle collective backend (gloo),
equivalence with single-process training, checkpoints, fault tolerance and resume."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.train  # TrainingFailedError; also when this module runs alone

from stfpm import load_model
from stfpm.data import make_synthetic_dataset
from stfpm.raytrain.driver import train_distributed
from stfpm.noise import init_ray
from stfpm.training.config import TrainConfig
from stfpm.training.run import train

CFG = dict(backbone="efficientnet_lite0", epochs=3, image_size=64, batch_size=8, seed=0,
           augment="none")  # the same images in one process and in two workers: comparable loss curves


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt") / "data"
    make_synthetic_dataset(root, n_train=24, n_test=8, size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def local_ray():
    # "local": never another process's Ray that the machine advertises (a `ray start`, another
    # test's ray.cluster_utils.Cluster); init_ray pins the workers to this one too
    # (stfpm.own_cluster: Ray Train's placement-group cleaner asks them)
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_workers_follow_the_single_process_loss_curve(data, tmp_path, local_ray):
    """Same seed; 2 workers at per-worker batch 4 vs 1 process at batch 8. Batch order and
    per-worker batch-norm statistics differ, so the curves are compared within 15% per
    epoch, and both must fall."""
    single = train(str(data), str(tmp_path / "single"), TrainConfig(**CFG), progress=False)
    dist = train_distributed(str(data), str(tmp_path / "dist"), TrainConfig(**CFG), num_workers=2,
                             storage=str(tmp_path / "storage"), threads_per_worker=1)
    a = np.array([r["loss"] for r in single.history])
    b = np.array([r["loss"] for r in dist.history])
    print("single", a, "2 workers", b)
    np.testing.assert_allclose(b, a, rtol=0.15)
    assert b[-1] < b[0] and a[-1] < a[0]
    assert [r["workers"] for r in dist.history] == [2, 2, 2]
    # the model directory is the same format as single-process training's
    s_meta = json.loads((tmp_path / "single" / "model.json").read_text())
    d_meta = json.loads((tmp_path / "dist" / "model.json").read_text())
    assert set(s_meta) == set(d_meta) and d_meta["metrics"]["image_auroc"] is not None
    assert d_meta["threshold"]["source"] == "holdout_quantile"
    assert len((tmp_path / "dist" / "train_log.jsonl").read_text().splitlines()) == 3
    load_model(tmp_path / "dist")


def _train_worker_pids() -> set[int]:
    """Live (not zombie) Ray Train workers of THIS test process's Ray (ray.init starts the
    raylet as our child, and the raylet starts the workers): another Ray on a shared machine
    runs workers of its own, which must never be the ones killed."""
    parents, workers = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state, ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            parents[int(proc.name)] = int(ppid)
            if state != "Z" and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                workers.add(int(proc.name))
        except OSError:
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid for pid in workers if ours(pid)}


def _kill_a_worker_after_first_checkpoint(run_dir, stale: set[int], done: threading.Event, killed: list):
    """SIGKILL one of this run's Ray Train workers once an epoch's checkpoint is registered
    (Ray writes the checkpoint manager's snapshot then). Workers of earlier runs may linger:
    they are in `stale` and never chosen."""
    while not done.is_set():
        if (run_dir / "checkpoint_manager_snapshot.json").exists():
            for pid in sorted(_train_worker_pids() - stale):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.2)


def _train_with_a_killed_worker(data, out, storage, name, max_failures):
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint,
                              args=(storage / name, _train_worker_pids(), done, killed), daemon=True)
    killer.start()
    try:
        return train_distributed(str(data), str(out), TrainConfig(**CFG), num_workers=2, storage=str(storage),
                                 name=name, max_failures=max_failures, threads_per_worker=1)
    finally:
        done.set()
        killer.join()
        assert killed, "no worker of this run was killed"


def test_a_killed_worker_is_replaced_and_training_finishes(data, tmp_path, local_ray):
    result = _train_with_a_killed_worker(data, tmp_path / "model", tmp_path / "storage", "ft", max_failures=1)
    epochs = [r["epoch"] for r in result.history]
    assert epochs == [1, 2, 3], epochs
    assert result.history[-1]["segment_start"] > 1  # the replacement resumed from a checkpoint
    load_model(tmp_path / "model")


def test_rerun_with_the_same_name_resumes(data, tmp_path, local_ray):
    with pytest.raises(ray.train.TrainingFailedError):  # the killed worker is not replaced
        _train_with_a_killed_worker(data, tmp_path / "model", tmp_path / "storage", "resume", max_failures=0)
    assert not (tmp_path / "model" / "model.json").exists()
    result = train_distributed(str(data), str(tmp_path / "model"), TrainConfig(**CFG), num_workers=2,
                               storage=str(tmp_path / "storage"), name="resume", threads_per_worker=1)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.history[0]["segment_start"] == 1 and result.history[-1]["segment_start"] > 1
    # another configuration (an lr that is not the recipe's 0.1) under the same name is refused, naming the way out
    with pytest.raises(Exception, match="another --name"):
        train_distributed(str(data), str(tmp_path / "other"), TrainConfig(**{**CFG, "lr": 0.05}), num_workers=2,
                          storage=str(tmp_path / "storage"), name="resume", threads_per_worker=1)


def test_ray_train_epochs_pick_the_whole_views_and_tiles_one_process_training_does(tmp_path, local_ray):
    """With the whole+tiles views (128-px images at a 64-px input: auto picks them) a worker
    keeps each image's whole view and its epoch's tile, the rows one-process training takes
    (`epoch_rows`), regrouped into full batches; the model records the views."""
    from stfpm.raytrain.driver import _decode_resize, epoch_batches
    from stfpm.data.tiling import Tiling
    from stfpm.training.loop import epoch_rows

    root = tmp_path / "data"
    make_synthetic_dataset(root, n_train=10, n_test=4, size=128, seed=2)
    paths = sorted(str(p) for p in (root / "train" / "good").iterdir())[:5]
    rows = _decode_resize({"bytes": [Path(p).read_bytes() for p in paths], "path": paths}, 64, 64, 0, True)
    assert rows["image"].shape == (25, 64, 64, 3) and rows["tiles"].tolist() == [4] * 25
    chunks = [{k: v[i:i + 7] for k, v in rows.items()} for i in range(0, 25, 7)]  # batches cut across images
    for epoch in (1, 2, 3):
        kept = [(images, keys) for images, keys in epoch_batches(chunks, 4, epoch, seed=0)]
        assert [len(k) for _, k in kept] == [4, 4, 2]
        expected = [rows["path"][r] for r in epoch_rows(list(rows["path"]), Tiling(64, 0, True), epoch, 0)]
        assert [str(k) for _, keys in kept for k in keys] == expected
    result = train_distributed(str(root), str(tmp_path / "model"), TrainConfig(**{**CFG, "epochs": 1}),
                               num_workers=2, storage=str(tmp_path / "storage"), threads_per_worker=1)
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["input"]["tile_whole"] and card["recipe"]["views"] == "whole+tiles" and len(result.history) == 1
