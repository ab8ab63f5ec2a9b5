"""The README's first-hour path, exactly as the README prints it (issue 25): the commands are
read from the fenced block under "## The first hour" and run one by one in a shell, in an empty
folder, with an empty weights cache, so README and code cannot drift apart and nothing the
path needs is downloaded (the default teacher's weights ship in a pip package)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from stfpm.model.weights import ZOO

REPO = Path(__file__).resolve().parents[1]


def first_hour_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The first hour"):]
    section = section[:section.index("\n## ", 1)]
    block = re.search(r"^```\n(.*?)^```", section, re.S | re.M)
    assert block, "README's first-hour section has no fenced command block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_first_hour_path_runs_as_printed(tmp_path, private_ray_tmpdir):
    commands = first_hour_commands()
    verbs = [c.split()[1] for c in commands if c.startswith("stfpm ")]
    assert verbs[0] == "synth"  # the small synthetic dataset the path runs on
    assert [v for v in verbs if v in ("train", "evaluate", "predict", "score")] == ["train", "evaluate", "predict", "score"]
    assert any("--model patchcore" in c for c in commands)  # the recommended model
    assert commands[-1].startswith("python ")  # reading the table

    # `stfpm` is this checkout's CLI (a shim in front of PATH), the weights cache is empty
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "stfpm").write_text(f"#!/bin/sh\nexec {sys.executable} -m stfpm.cli \"$@\"\n")
    (shim / "python").symlink_to(sys.executable)
    (shim / "stfpm").chmod(0o755)
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "STFPM_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    outputs, errors = [], []
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
        errors.append(done.stderr)

    card = json.loads((work / "models" / "parts" / "model.json").read_text())
    assert card["model_name"] == "PatchCore" and card["backbone"] not in ZOO  # nothing to download
    assert not cache.exists() or not any(cache.rglob("*.pdparams"))
    assert "32 images" in outputs[verbs.index("predict")]
    said = errors[verbs.index("train")]  # training says what it does before it is done
    assert said.index("building the efficientnet_lite0 memory bank") < said.index("calibrating the threshold"), said
    success = json.loads((work / "out" / "scores" / "_SUCCESS").read_text())
    assert success["counts"]["scored"] == 32 and success["layout"]["fused"]
    table = outputs[-1]
    for kind in ("good", "blur", "scratch"):  # the table read back: one line per kind
        assert re.search(rf"^{kind}\s+0\.\d+\s+[01]\.\d+", table, re.M), table
