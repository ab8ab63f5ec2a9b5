"""The scoring service (`stfpm serve`): real Ray Serve on a local 2-CPU Ray, real HTTP on
127.0.0.1, a two-category registry (a trained demo-size Lite0 model and a random-weight one).
A served score is `predict`'s and the nightly table's for the same bytes; bad input is a 4xx
with one line of JSON and the replicas keep serving; a model that cannot load stops the start
with the ModelCard's message."""
from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pandas as pd
import pytest
import ray
from typer.testing import CliRunner

from stfpm import create_model
from stfpm.cli import app as cli_app
from stfpm.model.card import Calibration, InputSpec, ModelCard, ModelDirError, read_card, write_card
from stfpm.serving.app import ServeOptions, build, build_app, check_models, model_uris, parse_replicas, run

MAX_BYTES = 200_000
MAX_PIXELS = 300 * 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """data/ (synthetic, 64 px), models/bottle (Lite0 trained 2 epochs: a calibrated threshold,
    score scale and in-distribution check), models/tile (random weights, threshold at the
    median of the test images' scores) and models/registry.yaml naming both (relative)."""
    import paddle

    from stfpm.data import make_synthetic_dataset
    from stfpm.model.artifact import save_model
    from stfpm.model.inference import Predictor
    from stfpm.nn import STFPM
    from stfpm.training.config import TrainConfig
    from stfpm.training.run import train

    root = tmp_path_factory.mktemp("serving")
    make_synthetic_dataset(root / "data", n_train=16, n_test=8, size=64, seed=0)
    train(str(root / "data"), str(root / "models" / "bottle"),
          TrainConfig(backbone="efficientnet_lite0", epochs=2, image_size=64, seed=0), progress=False)
    paddle.seed(1)
    tile = root / "models" / "tile"
    save_model(STFPM("efficientnet_lite0"), tile, ModelCard(
        model_name="STFPM", backbone="efficientnet_lite0", input=InputSpec.for_backbone("efficientnet_lite0", 64),
        calibration=Calibration(0.0, 0.0, 1.0)))
    scores = [p.score for p in Predictor.open(tile).predict([p.read_bytes() for p in image_paths(root)])]
    write_card(tile, dataclasses.replace(read_card(tile), calibration=Calibration(
        float(np.median(scores)), min(scores), max(scores), source="test")))
    (root / "models" / "registry.yaml").write_text("models:\n  bottle: bottle\n  tile: tile\n")
    return root


def image_paths(root: Path) -> list[Path]:
    return sorted((root / "data" / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def service(workspace):
    """The nightly table of the test images (`stfpm score` on this Ray, before Serve takes the
    CPUs), then the registry served on 127.0.0.1; Serve and Ray shut down after."""
    from ray import serve

    from stfpm.scoring import score

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        score(str(workspace / "models" / "bottle"), str(workspace / "data" / "test"), str(workspace / "table"),
              batch_size=4, actors="1", fused=True, verbose=False)
        port = free_port()
        options = ServeOptions(model=str(workspace / "models" / "registry.yaml"), max_batch_size=8,
                               batch_wait_ms=50, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
        models = run(options, port=port, blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, models
    finally:
        serve.shutdown()
        ray.shutdown()


def post_image(client, category: str, data: bytes, **params) -> httpx.Response:
    return client.post(f"/v1/{category}/predict", content=data, params=params)


def test_health_and_models(service, workspace):
    client, _ = service
    assert client.get("/healthz").json() == {"status": "ok", "categories": ["bottle", "tile"]}
    listed = client.get("/v1/models").json()["models"]
    for category in ("bottle", "tile"):
        card = read_card(workspace / "models" / category)
        entry = listed[category]
        assert entry["model_version"] == card.model_version and entry["threshold"] == card.calibration.threshold
        assert entry["input_size"] == 64 and entry["model_name"] == "STFPM"


def test_served_scores_equal_predict_and_the_nightly_table(service, workspace):
    """The test images posted by 8 concurrent clients (so requests share forwards) score as
    `predict` scores them and as `stfpm score` wrote them, map PNG included."""
    client, _ = service
    paths = image_paths(workspace)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: post_image(client, "bottle", p.read_bytes(), map=1), paths))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    served = [a.json() for a in answers]
    assert max(s["batch_size"] for s in served) > 1          # batched across clients

    model = create_model(model_dir=workspace / "models" / "bottle")
    version = read_card(workspace / "models" / "bottle").model_version
    table = pd.read_parquet(workspace / "table" / "scores").set_index("image_uri")
    for path, s, res in zip(paths, served, model.predict([str(p) for p in paths], batch_size=3)):
        assert s["model_version"] == version and s["category"] == "bottle"
        assert s["score"] == pytest.approx(res["score"], rel=1e-5)
        assert s["norm_score"] == pytest.approx(res["norm_score"], rel=1e-5)
        assert s["is_anomaly"] == res["is_anomaly"] and s["decision"] == ("anomaly" if res["is_anomaly"] else "ok")
        assert s["ood"] == res["ood"] and s["ood_score"] == pytest.approx(res["ood_score"], rel=1e-5)
        row = table.loc[str(path)]
        assert s["score"] == pytest.approx(row.raw_score, rel=1e-5) and s["norm_score"] == pytest.approx(row.score, rel=1e-5)
        assert s["is_anomaly"] == row.is_anomaly and s["ood"] == row.ood and s["threshold"] == row.threshold
        served_map = cv2.imdecode(np.frombuffer(base64.b64decode(s["map_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
        table_map = cv2.imread(row.map_uri, cv2.IMREAD_UNCHANGED)
        assert served_map.shape == (64, 64) and np.array_equal(served_map, table_map)
        assert s["latency_ms"] > 0 and s["height"] == s["width"] == 64
    assert {s["is_anomaly"] for s in served} == {True, False}


def test_each_category_is_scored_by_its_own_model(service, workspace):
    client, _ = service
    path = image_paths(workspace)[0]
    bottle, tile = (post_image(client, c, path.read_bytes()).json() for c in ("bottle", "tile"))
    assert tile["model_version"] == read_card(workspace / "models" / "tile").model_version != bottle["model_version"]
    expected = next(iter(create_model(model_dir=workspace / "models" / "tile").predict(str(path))))
    assert tile["score"] == pytest.approx(expected["score"], rel=1e-5) and tile["ood"] is None


def test_threshold_per_request_and_multipart(service, workspace):
    client, _ = service
    data = image_paths(workspace)[0].read_bytes()
    default = post_image(client, "bottle", data).json()
    low = post_image(client, "bottle", data, threshold=default["score"] / 2).json()
    high = post_image(client, "bottle", data, threshold=default["score"] * 2).json()
    assert low["threshold"] == pytest.approx(default["score"] / 2) and low["is_anomaly"] and low["norm_score"] > 0.5
    assert not high["is_anomaly"] and high["norm_score"] < 0.5
    assert low["score"] == high["score"] == default["score"]   # the raw score never moves
    form = client.post("/v1/bottle/predict", files={"image": ("part.png", data, "image/png")},
                       data={"threshold": str(default["score"] / 2)})
    assert form.status_code == 200 and form.json()["score"] == default["score"] and form.json()["is_anomaly"]


def png(height: int, width: int) -> bytes:
    return cv2.imencode(".png", np.full((height, width, 3), 128, np.uint8))[1].tobytes()


def test_bad_input_is_a_4xx_with_one_line_and_the_service_lives(service, workspace):
    client, _ = service
    good = image_paths(workspace)[0].read_bytes()
    cases = [
        (post_image(client, "bottle", b"GIF89a not an image at all"), 422, "not a PNG, JPEG"),
        (post_image(client, "bottle", good[: len(good) // 2]), 422, "truncated"),
        (post_image(client, "bottle", b""), 422, "empty"),
        (post_image(client, "bottle", b"\0" * (MAX_BYTES + 1)), 413, "above the limit"),
        (post_image(client, "bottle", png(400, 400)), 413, "max_pixels"),
        (post_image(client, "cable", good), 404, "unknown category 'cable'"),
        (post_image(client, "bottle", good, threshold="high"), 400, "threshold must be a number"),
        (client.get("/v1/bottle/predict"), 405, "takes POST"),
        (client.get("/v2/anything"), 404, "no such path"),
        (client.post("/v1/bottle/predict", files={"a": ("a.png", good), "b": ("b.png", good)}), 400, "exactly one file"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, (status, answer.text)
        body = answer.json()
        assert set(body) == {"error"} and words in body["error"] and "\n" not in body["error"]
    # bad requests in the same batch as a good one cost only themselves
    with ThreadPoolExecutor(4) as pool:
        mixed = list(pool.map(lambda d: post_image(client, "bottle", d), [good, b"junk", good, good[:40]]))
    assert [a.status_code for a in mixed] == [200, 422, 200, 422]
    assert post_image(client, "bottle", good).status_code == 200


def test_our_counters_reach_prometheus(service, workspace):
    """ray_stfpm_serve_requests / anomalies / ood per category on the node's metrics endpoint
    (Ray exports them every few seconds)."""
    client, _ = service
    assert post_image(client, "tile", image_paths(workspace)[0].read_bytes(), threshold=0).status_code == 200
    assert post_image(client, "bottle", b"not an image").status_code == 422
    assert post_image(client, "cable", b"not an image").status_code == 404
    port = ray._private.worker.global_worker.node.metrics_export_port

    def series(text: str, name: str, *labels: str) -> list[float]:
        return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(f"ray_stfpm_serve_{name}") and all(label in line for label in labels)]

    deadline, text = time.time() + 120, ""
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        if (series(text, "requests", 'category="tile"', 'status="200"') and series(text, "anomalies", 'category="tile"')
                and series(text, "requests", 'category="bottle"', 'status="422"')):
            break
        time.sleep(3)
    shown = [line for line in text.splitlines() if line.startswith("ray_stfpm_serve_")]
    assert series(text, "requests", 'category="tile"', 'status="200"')[0] >= 1, shown
    assert series(text, "anomalies", 'category="tile"')[0] >= 1, shown           # threshold 0: every score is above
    assert sum(series(text, "requests", 'category="bottle"', 'status="422"')) >= 1, shown  # bad images, counted
    assert series(text, "requests", 'category="unknown"', 'status="404"'), shown  # unknown categories: one series


def test_a_model_that_cannot_load_stops_the_start(workspace, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(workspace / "models" / "bottle", broken)
    (broken / "student.safetensors").write_bytes(b"replaced")
    with pytest.raises(ModelDirError, match="does not match the sha256") as info:
        build(ServeOptions(model=str(broken)))
    assert "\n" not in str(info.value)
    result = CliRunner().invoke(cli_app, ["serve", str(broken), "--port", str(free_port())])
    assert result.exit_code == 2 and "does not match the sha256" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "reg.yaml").write_text(f"bottle: {workspace / 'models' / 'bottle'}\ncable: {tmp_path / 'nowhere'}\n")
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory"):
        check_models(model_uris(str(tmp_path / "reg.yaml")))


def test_options_for_serve_run_and_the_cluster(workspace):
    """`serve run stfpm.serving.app:build_app model=... replicas=1..4` (args are strings):
    an autoscaled deployment per category on queue length, GPUs when asked."""
    app = build_app({"model": str(workspace / "models" / "registry.yaml"), "replicas": "1..4",
                     "max_batch_size": "8", "gpus_per_replica": "1"})
    scorers = app._bound_deployment.init_args[0]  # the Router's first argument: {category: bound ModelScorer}
    assert set(scorers) == {"bottle", "tile"}
    deployment = scorers["bottle"]._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 4, 8)
    assert deployment.ray_actor_options["num_gpus"] == 1 and deployment.max_ongoing_requests == 16
    assert parse_replicas("3") == (3, 3)
    for bad in ("0", "4..2", "x", "1..0"):
        with pytest.raises(ValueError, match="replicas"):
            parse_replicas(bad)
    with pytest.raises(ValueError, match="unknown argument"):
        build_app({"model": "m", "replica": "2"})
    with pytest.raises(ValueError, match="max_batch_size must be int"):
        ServeOptions.from_args({"model": "m", "max_batch_size": "many"})
    assert json.loads(json.dumps(dataclasses.asdict(ServeOptions.from_args({"model": "m"})))) == dataclasses.asdict(
        ServeOptions(model="m"))


def test_stfpm_serve_serves_until_interrupted(workspace):
    """The command itself, as a line PC's operator runs it: its own local Ray, the registry
    served on 127.0.0.1 until SIGINT, then Serve and Ray shut down and the command exits 0."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    proc = subprocess.Popen([sys.executable, "-m", "stfpm.cli", "serve", str(workspace / "models" / "registry.yaml"),
                             "--port", str(port), "--max-batch-size", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read_output():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not any("serving 2 model(s)" in x for x in lines):
            time.sleep(2)
        assert any(f"serving 2 model(s) at http://127.0.0.1:{port}" in x for x in lines), "".join(lines)[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=60).json()["categories"] == ["bottle", "tile"]
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/tile/predict", content=image_paths(workspace)[0].read_bytes(),
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["category"] == "tile"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
        reader.join(timeout=60)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert any(x.startswith("tile: STFPM") for x in lines)
