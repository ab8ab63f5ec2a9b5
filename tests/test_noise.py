"""Paddle's and Ray's known-harmless messages stay out of a run's output (stfpm.noise); other
lines, warnings included, still come through."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from stfpm.noise import native_lines_dropped

NOISE = (
    "not support input out tensor",
    "No ccache found",
    "Token authentication is enabled for this Ray cluster",
    "has constructor arguments in the object store and max_restarts > 0",
    "does not have any available CPUs",
    "When training, we now always track global mean and variance",
)
REPO = Path(__file__).resolve().parents[1]


def test_native_filter_drops_only_the_named_lines(capfd):
    with native_lines_dropped("harmless thing"):
        os.write(2, b"W1201 eager_utils.cc] a harmless thing happened\nE1201 a real problem\npartial")
        print("python's own stderr", file=sys.stderr)
    err = capfd.readouterr().err
    assert "harmless thing" not in err
    assert "E1201 a real problem\n" in err and "partial" in err and "python's own stderr" in err


def _stfpm(*args, env) -> str:
    done = subprocess.run([sys.executable, "-m", "stfpm.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=1800, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output


def _stfpm_on_a_terminal(*args, env) -> str:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal, as a person at a shell does."""
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "stfpm.cli", *map(str, args)], env=env,
                            stdin=child, stdout=child, stderr=child)
    os.close(child)
    chunks, deadline = [], time.monotonic() + 1800
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunks.append(os.read(main, 1 << 16))
                continue
            except OSError:  # the terminal closed: every process on it is gone
                break
        if proc.poll() is not None:  # exited; Ray's daemons may hold the terminal a while longer
            break
    os.close(main)
    output = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=60) == 0, output[-5000:]
    return output


def test_train_on_ray_and_score_print_none_of_the_known_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="default")  # every warning once per place: the noise would show
    data = tmp_path / "data"
    _stfpm("synth", data, "--n-train", 10, "--n-test", 4, "--size", 64, env=env)
    output = _stfpm("train", data, "--out", tmp_path / "model", "--backbone", "efficientnet_lite0", "--epochs", 1,
                    "--image-size", 64, "--batch-size", 4, "--workers", 2, "--storage", tmp_path / "ray", env=env)
    assert "model written" in output
    scored = _stfpm_on_a_terminal("score", tmp_path / "model", data / "test", tmp_path / "audit", "--batch-size", 2,
                                  "--cpus-per-actor", 0.5, env=env)
    assert "4 scored" in scored
    assert "\r[" + "#" * 30 + "] 4/4 rows" in scored and "images/s  ETA" in scored  # the progress bar, done
    output += scored
    assert [line for line in output.splitlines() if any(n in line for n in NOISE)] == []  # names the process too
