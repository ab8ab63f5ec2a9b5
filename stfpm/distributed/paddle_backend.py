"""A Ray Train backend for PaddlePaddle collectives (Ray ships none).

`on_start` collects every worker's address and sets Paddle's collective environment per
rank, the way Ray's TensorFlow backend builds TF_CONFIG. The training function then calls
`init_process_group()` itself: Ray Train V2 runs it in its own thread. Verified facts this
relies on are in DESIGN.md §8 (gloo on CPU; stale MASTER_ADDR/PORT take precedence)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


@dataclass
class PaddleConfig(BackendConfig):
    """backend: "gloo" (CPU), "nccl" (GPU) or None to pick by whether workers have GPUs.
    threads_per_worker: intra-op threads per worker (None keeps Paddle's default)."""

    backend: str | None = None
    threads_per_worker: int | None = None

    @property
    def backend_cls(self):
        return PaddleBackend

    def to_dict(self) -> dict:
        return {"backend": self.backend, "threads_per_worker": self.threads_per_worker}


def _worker_endpoint() -> str:
    from ray.train._internal.utils import get_address_and_port

    address, port = get_address_and_port()
    return f"{address}:{port}"


def _set_paddle_env(endpoints: list[str], index: int, backend: str | None, threads: int | None) -> None:
    gpu_ids = ray.get_gpu_ids()
    chosen = backend or ("nccl" if gpu_ids else "gloo")
    for stale in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(stale, None)
    os.environ.update({
        "PADDLE_TRAINER_ID": str(index),
        "PADDLE_TRAINERS_NUM": str(len(endpoints)),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[index],
        "PADDLE_DISTRI_BACKEND": chosen,
    })
    if gpu_ids:
        # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs, so its first GPU is index 0.
        os.environ["FLAGS_selected_gpus"] = "0"
        os.environ["STFPM_RAY_GPU_IDS"] = ",".join(str(g) for g in gpu_ids)
    if threads:
        os.environ["STFPM_NUM_THREADS"] = str(threads)


class PaddleBackend(Backend):
    def on_start(self, worker_group, backend_config: PaddleConfig):
        endpoints = worker_group.execute(_worker_endpoint)
        ray.get([worker_group.execute_single_async(i, _set_paddle_env, endpoints=endpoints, index=i,
                                                   backend=backend_config.backend,
                                                   threads=backend_config.threads_per_worker)
                 for i in range(len(endpoints))])


def init_process_group() -> str:
    """Inside the training function: set the device from Ray's assignment, apply the thread
    limit and join the collective. Returns the device string."""
    import paddle

    from stfpm.runtime import configure_threads

    configure_threads()  # threads_per_worker, else Ray's OMP_NUM_THREADS for the worker
    device = "cpu"
    if os.environ.get("STFPM_RAY_GPU_IDS") and paddle.device.is_compiled_with_cuda():
        device = "gpu:0"  # the first (only) GPU visible to this worker: the one Ray assigned
    paddle.set_device(device)
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        paddle.distributed.init_parallel_env()
    return device
