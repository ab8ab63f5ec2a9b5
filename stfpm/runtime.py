"""Process-wide runtime settings: Paddle's CPU threads, the device Ray assigned, logging."""
from __future__ import annotations

import logging
import os
import sys

# `import paddle` sets OMP_NUM_THREADS=1 when it is unset, so the value the process started
# with is read here, when stfpm is imported (stfpm/__init__.py imports this module first);
# a "1" found after Paddle was imported is taken for Paddle's own (STFPM_NUM_THREADS=1 forces 1).
_OMP_NUM_THREADS_AT_START = os.environ.get("OMP_NUM_THREADS")
if "paddle" in sys.modules and _OMP_NUM_THREADS_AT_START == "1":
    _OMP_NUM_THREADS_AT_START = None


def cpu_threads() -> int:
    """STFPM_NUM_THREADS, else OMP_NUM_THREADS as the process started (Ray sets it to an
    actor's CPUs), else the cores this process may run on."""
    for value in (os.environ.get("STFPM_NUM_THREADS"), _OMP_NUM_THREADS_AT_START):
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    return len(os.sched_getaffinity(0))


def configure_threads(threads: int | None = None) -> int:
    """Paddle's CPU kernels use ONE thread unless told otherwise (FLAGS_paddle_num_threads
    defaults to 1); measured here, 2 threads make a ResNet18 STFPM forward ~1.4x faster."""
    import paddle

    n = threads or cpu_threads()
    paddle.base.core.set_num_threads(n)
    return n


def paddle_device(gpu_ids: list, cuda_visible: str | None, compiled_with_cuda: bool) -> tuple[str, str]:
    """(Paddle device, description) for the GPUs Ray assigned to this process (`ray.get_gpu_ids()`);
    used by the scoring actors and the Ray Train workers.

    Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs, so the device index is the assigned
    id's position in that list (0 for one GPU), never a hard-coded gpu:0. Without CUDA in
    Paddle (fake GPUs in tests, a CPU wheel) the forward runs on the CPU and the
    description still records what Ray assigned."""
    if not gpu_ids:
        return "cpu", "cpu"
    assigned = str(gpu_ids[0])
    visible = [d.strip() for d in cuda_visible.split(",")] if cuda_visible else []
    index = visible.index(assigned) if assigned in visible else int(assigned)
    if not compiled_with_cuda:
        return "cpu", f"cpu (ray gpu {assigned} assigned; paddle built without CUDA)"
    return f"gpu:{index}", f"gpu:{index} (ray gpu {assigned})"


def ray_paddle_device() -> tuple[str, str]:
    """`paddle_device` of this Ray worker (CPU outside Ray)."""
    import paddle
    import ray

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return paddle_device(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"), paddle.is_compiled_with_cuda())


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is emitted (a test runner may
    swap it between commands)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Messages of the `stfpm` loggers (one per module) as plain lines on stderr: called by the
    CLI, the job entrypoints and the rank-0 Ray Train worker, never by library code itself."""
    package = logging.getLogger("stfpm")
    package.setLevel(level)
    # Paddle's distributed utilities put a handler on the root logger when imported: propagating
    # to it printed every line twice (once plain, once "[time] [INFO] loop.py:147 - ...").
    package.propagate = False
    if not any(isinstance(h, _CurrentStderr) for h in package.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
