"""A Ray Train backend for PaddlePaddle collectives (Ray ships none), built like Ray's own
torch backend (`ray/train/torch/config.py`): a BackendConfig + Backend pair whose hooks own
the process group.

- `on_start` collects every worker's address, sets Paddle's collective environment per rank
  (the way Ray's TensorFlow backend builds TF_CONFIG) and joins the collective on every worker
  (`paddle.distributed.init_parallel_env`, gloo on CPU, nccl on GPU);
- `on_shutdown` leaves it (`destroy_process_group`);
- `train_func_context` wraps the training function: Ray Train V2 runs that function in its
  own thread, and Paddle's current device is per thread, so the device Ray assigned and the
  thread limit are set there.
The facts this relies on are in docs/design.md ("Ray Train and Paddle collectives")."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


@dataclass
class PaddleConfig(BackendConfig):
    """backend: "gloo" (CPU), "nccl" (GPU) or None to pick by whether workers have GPUs.
    threads_per_worker: intra-op threads per worker (None: Ray's OMP_NUM_THREADS for it)."""

    backend: str | None = None
    threads_per_worker: int | None = None

    @property
    def backend_cls(self):
        return PaddleBackend

    @property
    def train_func_context(self):
        return _WorkerDevice

    def to_dict(self) -> dict:
        return {"backend": self.backend, "threads_per_worker": self.threads_per_worker}


class _WorkerDevice:
    """Around the training function, in its thread: the device Ray assigned, the thread limit."""

    def __enter__(self):
        import paddle

        from stfpm.runtime import configure_threads, ray_paddle_device

        configure_threads()  # threads_per_worker, else Ray's OMP_NUM_THREADS for the worker
        paddle.set_device(ray_paddle_device()[0])
        return self

    def __exit__(self, *exc):
        return False


def _worker_endpoint() -> str:
    """This worker's address and a port free on its node, for Paddle's collective."""
    address = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{address}:{port}"


def _set_paddle_env(endpoints: list[str], index: int, backend: str | None, threads: int | None) -> None:
    from stfpm.runtime import ray_paddle_device

    device = ray_paddle_device()[0]
    for stale in ("MASTER_ADDR", "MASTER_PORT"):  # Paddle prefers them to the endpoints below
        os.environ.pop(stale, None)
    os.environ.update({
        "PADDLE_TRAINER_ID": str(index),
        "PADDLE_TRAINERS_NUM": str(len(endpoints)),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[index],
        "PADDLE_DISTRI_BACKEND": backend or ("nccl" if device.startswith("gpu") else "gloo"),
    })
    if device.startswith("gpu"):
        os.environ["FLAGS_selected_gpus"] = device.split(":")[1]
    if threads:
        os.environ["STFPM_NUM_THREADS"] = str(threads)


def _join_collective() -> None:
    import paddle

    from stfpm.runtime import ray_paddle_device

    paddle.set_device(ray_paddle_device()[0])
    if int(os.environ["PADDLE_TRAINERS_NUM"]) > 1:
        paddle.distributed.init_parallel_env()


def _leave_collective() -> None:
    import paddle.distributed as dist

    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1 and dist.is_initialized():
        dist.destroy_process_group()


class PaddleBackend(Backend):
    def on_start(self, worker_group, backend_config: PaddleConfig):
        endpoints = worker_group.execute(_worker_endpoint)
        ray.get([worker_group.execute_single_async(i, _set_paddle_env, endpoints=endpoints, index=i,
                                                   backend=backend_config.backend,
                                                   threads=backend_config.threads_per_worker)
                 for i in range(len(endpoints))])
        worker_group.execute(_join_collective)  # on every worker at once: init_parallel_env is a rendezvous

    def on_shutdown(self, worker_group, backend_config: PaddleConfig):
        worker_group.execute(_leave_collective)
