"""Paddle's and Ray's known-harmless messages, each silenced where it arises; all others pass.

- "No ccache found" (UserWarning at `import paddle`): about compiling C++ extensions, which
  stfpm never does. Filtered by message and module before Paddle is imported.
- "When training, we now always track global mean and variance." (UserWarning of every
  BatchNorm forward in training mode): Paddle announcing its own behaviour. Filtered by
  message and module.
- "Paddle static graph(PIR) not support input out tensor for now!!!!!" (a C++ glog line on
  every model load): Paddle's own `paddle.add`/`divide`/... pass `out=None` to the C++ op,
  which PIR tracing takes for an out tensor. Dropped from stderr while a program is traced.
- "[Paddle2ONNX] Start parsing the Paddle model file..." and its two companions (C++ lines on
  stdout at every ONNX conversion): progress of a conversion that takes a second. Dropped from
  stdout while `stfpm.model.export.program_onnx` converts.
- "Token authentication is enabled for this Ray cluster" (on every local `ray.init`): Ray
  announcing its default for a new local Ray. `init_ray` filters that one message of Ray's
  token-setup logger; the other authentication messages (a missing or wrong token) pass.
- "has constructor arguments in the object store and max_restarts > 0" (an error-level
  core_worker line per scoring run, and per Ray Train run): Ray Data and Ray Train pass their
  actors' context by object reference and restart failed actors; they hold those references
  until the run ends, so a restart finds them. Dropped from the driver's stderr (where worker
  logs are printed too) while a pipeline or a training run goes.
- "Progress bars disabled. To enable, set ..." (Ray Data, once per process): the scoring run
  turns Ray Data's progress off on purpose and draws its own (stfpm.scoring.progress).
- "does not have any available CPUs. The Dataset job will hang" (Ray Data, once per process,
  when a dataset executes while `ray.available_resources()` shows no free CPU): in Ray Train
  workers, which hold the CPUs while they iterate datasets that are already materialized and
  need none; and in the training driver, whose second dataset (the held-out images) starts
  while the cluster's resource view still counts the first one's just-finished tasks (seen
  as 1 of 2 CPUs free right after a `materialize`). Dropped by a filter on Ray Data's logger
  in those workers, and in the driver only while it materializes its training datasets.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings

PIR_OUT_TENSOR = "not support input out tensor for now"
PADDLE2ONNX_PROGRESS = "[Paddle2ONNX] "
ACTOR_ARGS_IN_OBJECT_STORE = "has constructor arguments in the object store and max_restarts > 0"
TOKEN_AUTH_ENABLED = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled"
PROGRESS_BARS_DISABLED = "Progress bars disabled. To enable, set"
NO_CPUS_FOR_DATASET = "does not have any available CPUs. The Dataset job will hang"


def install_warning_filters() -> None:
    warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning,
                            module=r"paddle\.utils\.cpp_extension")
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance",
                            category=UserWarning, module=r"paddle\.nn\.layer\.norm")


@contextlib.contextmanager
def native_lines_dropped(*needles: str, fd: int = 2):
    """Inside the block, lines written to file descriptor `fd` (2: stderr, C++ glog lines too)
    that contain one of `needles` are dropped; every other line is forwarded as it comes. Only
    for blocks that start no processes (a child would inherit the pipe)."""
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    encoded = [n.encode() for n in needles]

    def forward():
        pending = b""
        while chunk := os.read(read_end, 1 << 16):
            *lines, pending = re.split(rb"(?<=[\n\r])", pending + chunk)
            kept = b"".join(line for line in lines if not any(n in line for n in encoded))
            if kept:
                os.write(original, kept)
        if pending and not any(n in pending for n in encoded):
            os.write(original, pending)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(original, fd)  # closes the pipe's write end: the forwarder reads to the end and stops
        thread.join(timeout=10)
        os.close(original)
        if not thread.is_alive():
            os.close(read_end)


class _DropMessage(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def _drop(logger: logging.Logger, needle: str) -> None:
    if not any(isinstance(f, _DropMessage) and f.needle == needle for f in logger.filters):
        logger.addFilter(_DropMessage(needle))


def drop_materialized_dataset_cpu_warning() -> None:
    """For processes that iterate materialized datasets while holding every CPU (Ray Train workers)."""
    _drop(logging.getLogger("ray.data.dataset"), NO_CPUS_FOR_DATASET)


@contextlib.contextmanager
def dataset_cpu_warning_dropped():
    """For the training driver while it materializes its own datasets back to back: the only
    CPUs it sees taken are its previous dataset's, already finished."""
    logger, drop = logging.getLogger("ray.data.dataset"), _DropMessage(NO_CPUS_FOR_DATASET)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def drop_progress_bars_disabled_notice() -> None:
    """For the scoring driver, which turns Ray Data's progress off to draw its own."""
    _drop(logging.getLogger("ray.data._internal.progress"), PROGRESS_BARS_DISABLED)


def init_ray(address: str | None = None, runtime_env: dict | None = None, pin_workers: bool = True, **kwargs):
    """ray.init, without Ray's announcement that a new local Ray uses token auth (its default),
    and with every worker pinned to this cluster (stfpm.own_cluster), which Ray
    Train needs. `pin_workers=False` (Ray Data scoring, which starts no Ray Train run) leaves
    the hook out: a job with it took 21.7-26.4 s for a 1,000-image scoring run on a local Ray,
    19.2-20.0 s without (3 runs each, bench/RESULTS.md, issue 14)."""
    import ray

    from stfpm.own_cluster import with_own_cluster_hook

    _drop(logging.getLogger("ray._private.authentication.authentication_token_setup"), TOKEN_AUTH_ENABLED)
    if pin_workers:
        runtime_env = with_own_cluster_hook(runtime_env)
    return ray.init(address=address, runtime_env=runtime_env, **kwargs)
