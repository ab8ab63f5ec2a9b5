"""Data-parallel STFPM training on Ray Train: the single-process step and epoch functions
of stfpm.training.loop, run in every worker under paddle.DataParallel, fed by Ray Data.

Images are decoded and resized once in Ray Data CPU tasks and materialised; each worker
streams its shard of the training images and sees all held-out images. Every epoch is
reported with a checkpoint (student, best student, optimizer state, history) so a rerun
with the same name resumes and a replaced worker continues from the last epoch."""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from stfpm.noise import ACTOR_ARGS_IN_OBJECT_STORE, dataset_cpu_warning_dropped, init_ray, native_lines_dropped
from stfpm.training.calibration import finalize
from stfpm.training.config import TrainConfig, TrainResult, split_dataset
from stfpm.training.views import resolve_views

CHECKPOINT_STATE = "state.json"


def _decode_resize(batch: dict, size: int, tile_size: int | None = None, tile_overlap: int = 0,
                   tile_whole: bool = False) -> dict:
    """Each file's model input; a tiled model's tiles (after its whole view, for the
    "whole+tiles" views), one row each, keyed "path#k" as in one-process training
    (stfpm.training.config.load_images)."""
    from stfpm.data import prepare_input
    from stfpm.data.tiling import tiling_of

    tiling = tiling_of(tile_size, tile_overlap, tile_whole)
    tiles = [prepare_input(bytes(data), size, str(path), tiling=tiling).tiles
             for data, path in zip(batch["bytes"], batch["path"])]
    keys = [str(p) if tiling is None else f"{p}#{k}" for p, t in zip(batch["path"], tiles) for k in range(len(t))]
    if tiling is not None and tiling.whole:  # each row's image's tile count: what an epoch picks from
        return {"image": np.concatenate(tiles), "path": np.array(keys),
                "tiles": np.array([len(t) - 1 for t in tiles for _ in range(len(t))])}
    return {"image": np.concatenate(tiles), "path": np.array(keys)}


def epoch_batches(batches, size: int, epoch: int, seed: int):
    """A worker's batches of an epoch: as they come, except with the whole+tiles views, where
    only each image's whole view and its epoch's tile are kept (`stfpm.training.loop.trains_on`,
    the rows one-process training picks) and regrouped into batches of `size`."""
    from stfpm.training.loop import trains_on

    pending: list[tuple] = []
    for batch in batches:
        if "tiles" not in batch:
            yield batch["image"], batch["path"]
            continue
        pending += [(image, path) for image, path, tiles in zip(batch["image"], batch["path"], batch["tiles"])
                    if trains_on(str(path), int(tiles), epoch, seed)]
        while len(pending) >= size:
            chunk, pending = pending[:size], pending[size:]
            yield np.stack([c[0] for c in chunk]), [c[1] for c in chunk]
    if pending:
        yield np.stack([c[0] for c in pending]), [c[1] for c in pending]


def image_dataset(uris: list[str], size: int, tiling=None):
    """Decoded, resized uint8 (S, S, 3) RGB images (or their tiles), materialised in the object
    store so epochs do not decode again. Local paths or s3:// URIs, read by Ray's workers."""
    import ray.data

    from stfpm.storage import filesystem_for

    filesystem, _ = filesystem_for(uris[0])
    paths = sorted(filesystem_for(u)[1] for u in uris)
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem)
    tile = {"tile_size": tiling.size, "tile_overlap": tiling.overlap, "tile_whole": tiling.whole} if tiling else {}
    return ds.map_batches(_decode_resize, fn_kwargs={"size": size, **tile}, batch_format="numpy").materialize()


def _save_tensors(path: Path, state: dict) -> None:
    from safetensors.numpy import save_file

    from stfpm.model.artifact import state_to_numpy

    save_file(state_to_numpy(state), str(path))


def _load_tensors(path: Path) -> dict:
    import paddle
    from safetensors.numpy import load_file

    return {k: paddle.to_tensor(v) for k, v in load_file(str(path)).items()}


def _all_reduce_mean(value: float, weight: int) -> float:
    """Weighted mean over workers (the epoch loss over all images seen by all workers)."""
    import paddle
    import paddle.distributed as dist

    if dist.get_world_size() <= 1:
        return value
    t = paddle.to_tensor([value * weight, float(weight)], dtype="float64")
    dist.all_reduce(t)
    total, count = t.numpy()
    return float(total / count)


def _average_batchnorm_statistics(layer) -> None:
    """DataParallel averages gradients but each worker's batch-norm running statistics
    follow its own shard; averaging them keeps every replica identical, so the held-out
    loss (and the model kept) is the same on every worker."""
    import paddle
    import paddle.distributed as dist

    world = dist.get_world_size()
    if world <= 1:
        return
    with paddle.no_grad():
        for name, buffer in layer.named_buffers():
            if name.endswith(("_mean", "_variance")):
                dist.all_reduce(buffer)
                buffer.set_value(buffer / world)


def train_loop_per_worker(config: dict) -> None:
    import paddle
    import ray.train

    from stfpm.data import normalize_batch
    from stfpm.nn import backbone_spec
    from stfpm.noise import drop_materialized_dataset_cpu_warning
    from stfpm.runtime import configure_logging
    from stfpm.training.loop import ProgressLog, augment_batch, build_network, make_optimizer, mean_loss, run_epoch, teacher_cache

    drop_materialized_dataset_cpu_warning()  # this worker holds the CPUs; its datasets need none

    cfg = TrainConfig(**config["cfg"])
    spec = backbone_spec(cfg.backbone)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        configure_logging()  # this worker process's epoch lines, for `ray job logs`
    device = paddle.device.get_device()  # set by PaddleConfig's train_func_context; the collective is joined
    network = build_network(cfg.backbone, cfg.teacher_weights, cfg.seed, cfg.student)
    optimizer = make_optimizer(network, cfg)
    start, best_loss, best_state, history = 1, float("inf"), None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
            if _without_timing(state["cfg"]) != _without_timing(config["cfg"]):
                raise ValueError("the checkpoint under this run name was made with another training "
                                 f"configuration ({state['cfg']}); use another --name to start afresh")
            network.student.set_state_dict(_load_tensors(Path(d) / "student.safetensors"))
            optimizer.set_state_dict(_load_tensors(Path(d) / "optimizer.safetensors"))
            best_state = _load_tensors(Path(d) / "best_student.safetensors")
            start, best_loss, history = state["epoch"] + 1, state["best_holdout_loss"], state["history"]
    model = paddle.DataParallel(network) if world > 1 else network
    per_worker_batch = max(1, cfg.batch_size // world)
    holdout_batches = list(ray.train.get_dataset_shard("holdout").iter_batches(batch_size=256, batch_format="numpy"))
    holdout = np.concatenate([normalize_batch(b["image"], spec.mean, spec.std) for b in holdout_batches])
    holdout_keys = [str(p) for b in holdout_batches for p in b["path"]]
    cache = teacher_cache(network, cfg)  # per worker: its shard's and the held-out images' features
    shard = ray.train.get_dataset_shard("train")
    log = ProgressLog(cfg.epochs, first_epoch=start, enabled=rank == 0)
    log.begin(f"training the {cfg.backbone} student on {world} worker(s), epochs {start}-{cfg.epochs}")
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        batches = ((augment_batch(normalize_batch(images, spec.mean, spec.std), cfg.augment, rng),
                    [str(p) for p in paths])
                   for images, paths in epoch_batches(shard.iter_batches(
                       batch_size=per_worker_batch, batch_format="numpy", local_shuffle_buffer_size=4 * per_worker_batch,
                       local_shuffle_seed=cfg.seed * 1000 + epoch + rank), per_worker_batch, epoch, cfg.seed))
        loss, seen = run_epoch(model, optimizer, batches, cache, log.within(epoch))
        loss = _all_reduce_mean(loss, seen)
        _average_batchnorm_statistics(network.student)
        elapsed = time.time() - t0
        holdout_loss = mean_loss(network, holdout, cfg.batch_size, cache, holdout_keys)  # identical on every worker
        record = {"epoch": epoch, "loss": loss, "holdout_loss": holdout_loss,
                  "images_per_s": seen * world / elapsed, "best": holdout_loss < best_loss,
                  "workers": world, "device": device, "segment_start": start}
        if record["best"]:
            best_loss = holdout_loss
            best_state = {k: v.clone() for k, v in network.student.state_dict().items()}
        history.append(record)
        log.epoch(record)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                d = Path(tmp)
                _save_tensors(d / "student.safetensors", network.student.state_dict())
                _save_tensors(d / "best_student.safetensors", best_state)
                _save_tensors(d / "optimizer.safetensors", optimizer.state_dict())
                (d / CHECKPOINT_STATE).write_text(json.dumps(
                    {"cfg": config["cfg"], "epoch": epoch, "best_holdout_loss": best_loss, "history": history}))
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(record)


def _without_timing(cfg: dict) -> dict:
    """A run's configuration as a resumed run must match it: --augment auto's evidence records
    how long the decision took, which differs between the run and its resumption."""
    evidence = cfg.get("augment_evidence")
    return cfg if not evidence else {**cfg, "augment_evidence": {k: v for k, v in evidence.items() if k != "seconds"}}


def train_distributed(data: str, out_dir: str, cfg: TrainConfig, num_workers: int = 2, use_gpu: bool = False,
                      storage: str | None = None, name: str | None = None, max_failures: int = 0,
                      threads_per_worker: int | None = None, cpus_per_worker: float = 1) -> TrainResult:
    """Train with `num_workers` Ray Train workers (Ray must be initialised, or is started
    locally), then finalize the model directory exactly as single-process training does.
    A PatchCore model has nothing to train data-parallel: its bank is built in this process."""
    import ray
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from stfpm.raytrain.paddle_backend import PaddleConfig
    from stfpm.nn import backbone_spec
    from stfpm.training.config import load_images
    from stfpm.training.loop import build_network
    from stfpm.training.run import train

    cfg = cfg.resolved()
    if cfg.model == "patchcore":
        return train(data, out_dir, cfg)
    split = split_dataset(data, cfg)
    cfg = resolve_views(cfg, [s.image for s in split.train])  # once here, as augment below
    if cfg.augment == "auto":  # decided once here, so every worker (and a resumed run) trains with the same
        from stfpm.training.loop import resolve_augment

        cfg = resolve_augment(cfg, build_network(cfg.backbone, cfg.teacher_weights, cfg.seed, cfg.student).teacher,
                              split)
    if not ray.is_initialized():
        init_ray()
    with dataset_cpu_warning_dropped():  # the resource view lags the first dataset's finished tasks (stfpm.noise)
        datasets = {name: image_dataset([split.uri(s.image) for s in samples], cfg.image_size, cfg.tiling)
                    for name, samples in (("train", split.train), ("holdout", split.holdout))}
    storage_filesystem = None
    if storage and storage.startswith("s3://"):
        from stfpm.storage import filesystem_for

        storage_filesystem, storage = filesystem_for(storage)
    run_config = ray.train.RunConfig(
        name=name or f"stfpm-{Path(out_dir).name}",
        storage_path=storage, storage_filesystem=storage_filesystem,
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    trainer = DataParallelTrainer(
        train_loop_per_worker, train_loop_config={"cfg": asdict(cfg)},
        backend_config=PaddleConfig(threads_per_worker=threads_per_worker),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=run_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    with native_lines_dropped(ACTOR_ARGS_IN_OBJECT_STORE):  # Ray Train's own actors, as Ray Data's (stfpm.noise)
        result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
        network = build_network(cfg.backbone, cfg.teacher_weights, cfg.seed, cfg.student)
        network.student.set_state_dict(_load_tensors(Path(d) / "best_student.safetensors"))
    spec = backbone_spec(cfg.backbone)
    holdout_images, _ = load_images([s.image for s in split.holdout], cfg.image_size, spec.mean, spec.std,
                                    cfg.tiling)
    return finalize(network, cfg, split, holdout_images, out_dir, state["history"])


def is_category(uri: str) -> bool:
    """Whether `uri` (local or s3://) is one category's dataset: it holds train/ or train.txt."""
    import pyarrow.fs as pafs

    from stfpm.storage import filesystem_for

    fs, path = filesystem_for(uri)
    marks = fs.get_file_info([path.rstrip("/") + "/train", path.rstrip("/") + "/train.txt"])
    return any(m.type != pafs.FileType.NotFound for m in marks)


def find_categories(root: str) -> list[str]:
    """Category folders under `root` (local or s3://): those `is_category` accepts."""
    import pyarrow.fs as pafs

    from stfpm.storage import filesystem_for

    fs, path = filesystem_for(root)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    found = [entry.base_name for entry in sorted(entries, key=lambda e: e.path)
             if entry.type == pafs.FileType.Directory and is_category(root.rstrip("/") + "/" + entry.base_name)]
    if not found:
        raise ValueError(f"{root}: no category folders (folders holding train/good or train.txt) found")
    return found


def train_categories(root: str, out: str, cfg: TrainConfig, num_workers: int = 0, parallel: int | None = None,
                     **distributed) -> dict:
    """One model per category folder of ROOT into OUT/<category>, then OUT/registry.yaml
    (the scoring job's registry, paths relative to it). With Ray workers, as many categories
    train at once as the cluster has CPUs for; in-process training runs them one by one.
    A failing category does not stop the others: failures are returned and named."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    from stfpm.storage import write_bytes
    from stfpm.training.run import train

    categories = find_categories(root)
    run_prefix = distributed.pop("name", None) or "stfpm"
    join = lambda base, name: base.rstrip("/") + "/" + name  # noqa: E731
    if num_workers:
        import ray

        if not ray.is_initialized():
            init_ray()
        per_run = num_workers * distributed.get("cpus_per_worker", 1)
        parallel = parallel or max(1, int(ray.cluster_resources().get("CPU", 1) // per_run))
    parallel = parallel or 1

    def run(category: str):
        try:
            if num_workers:
                train_distributed(join(root, category), join(out, category), cfg, num_workers=num_workers,
                                  name=f"{run_prefix}-{category}", **distributed)
            else:
                train(join(root, category), join(out, category), cfg)
            return category, None
        except Exception as e:  # reported per category below; the others go on
            return category, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        outcomes = list(pool.map(run, categories))
    trained = {c: c for c, err in outcomes if err is None}
    failed = {c: err for c, err in outcomes if err is not None}
    if trained:
        write_bytes(join(out, "registry.yaml"), yaml.safe_dump({"models": trained}, sort_keys=True).encode())
    return {"trained": sorted(trained), "failed": failed, "registry": join(out, "registry.yaml") if trained else None}
