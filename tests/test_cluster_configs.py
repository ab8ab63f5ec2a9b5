"""The cluster configs say what cluster/README.md promises: ray_cluster.yaml passes Ray's own
cluster-launcher validator (offline: no AWS call), every KubeRay / Kubernetes manifest parses
and has the fields autoscaling, token auth and the schedule depend on, the Dockerfile builds
the image they all name from files that exist, and the example audit config loads."""
from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from stfpm.audit import run as audit_run

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _cron_ok(expr: str) -> bool:
    """A five-field cron schedule with values in range (lists, ranges and steps allowed)."""
    limits = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    fields = expr.split()
    if len(fields) != 5:
        return False
    for text, (low, high) in zip(fields, limits, strict=True):
        for part in text.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not m or any(v is not None and not low <= int(v) <= high for v in m.group(2, 3)):
                return False
    return True


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """kind -> document, over every YAML under cluster/kuberay (each kind once)."""
    docs = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"{path}: a second {doc['kind']}"
            docs[doc["kind"]] = doc
    return docs


def test_ray_cluster_yaml_passes_rays_validator(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(launcher))  # defaults merged, as `ray up` does
    validate_config(prepared)  # Ray's JSON schema and cross-field checks
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert sum(t.get("max_workers", 0) for t in types.values()) <= prepared["max_workers"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    cpu = [t for name, t in types.items() if name != prepared["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) == 1 and len(cpu) == 1
    for worker in gpu + cpu:  # autoscaling from zero, with S3 access of their own
        assert worker["min_workers"] == 0 < worker["max_workers"]
        assert worker["node_config"]["IamInstanceProfile"]["Arn"].endswith("instance-profile/stfpm-ray-worker")
    assert cpu[0]["resources"]["CPU"] > gpu[0]["resources"]["CPU"]  # decoding capacity beside the GPUs
    assert "instance-profile/stfpm-ray-head" in head["node_config"]["IamInstanceProfile"]["Arn"]
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    assert prepared["docker"]["image"].endswith("stfpm-ray:0.1.0-gpu")
    assert prepared["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token ray start" in commands[-1]

    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["gpu"]["min_worker"] = 0  # a typo the validator must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def test_raycluster_autoscales_a_gpu_group_and_a_cpu_group_with_token_auth(manifests, launcher):
    rc = manifests["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray.__version__
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    images = {c["image"] for c in _containers(head["template"])}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu-decode"}
    for group in groups.values():
        assert group["minReplicas"] == group["replicas"] == 0 < group["maxReplicas"]
        images |= {c["image"] for c in _containers(group["template"])}
        assert group["template"]["spec"]["serviceAccountName"] == "stfpm-ray"
    gpu_limits = _containers(groups["gpu"]["template"])[0]["resources"]["limits"]
    cpu_limits = _containers(groups["cpu-decode"]["template"])[0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in cpu_limits
    assert images == {launcher["docker"]["image"]}  # the same image as the VM cluster
    account = manifests["ServiceAccount"]
    assert account["metadata"]["name"] == "stfpm-ray"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/stfpm-ray-worker")
    mounts = {m["name"]: m["mountPath"] for m in _containers(head["template"])[0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert mounts["audit-config"] == "/etc/stfpm"
    assert volumes["audit-config"]["configMap"]["name"] == "stfpm-audit-config"


def test_the_nightly_schedules_submit_the_audit_to_that_cluster(manifests):
    rc = manifests["RayCluster"]
    cron = manifests["RayCronJob"]
    assert cron["apiVersion"] == "ray.io/v1" and _cron_ok(cron["spec"]["schedule"])
    job = cron["spec"]["jobTemplate"]
    entry = shlex.split(job["entrypoint"])
    assert entry[:2] == ["python", "/home/ray/stfpm/jobs/nightly_audit.py"]
    assert entry[entry.index("--config") + 1].startswith("/etc/stfpm/")
    assert job["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert job["shutdownAfterJobFinishes"] is False and "rayClusterSpec" not in job

    plain = manifests["CronJob"]
    assert plain["apiVersion"] == "batch/v1" and _cron_ok(plain["spec"]["schedule"])
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    pod = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    assert container["command"][:2] == ["bash", "cluster/nightly_audit_cron.sh"]
    assert (CLUSTER / "nightly_audit_cron.sh").is_file()
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_ADDRESS"]["value"] == f"http://{rc['metadata']['name']}-head-svc:8265"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": rc["spec"]["authOptions"]["secretName"],
                                                                  "key": "auth_token"}
    assert container["image"] == _containers(rc["spec"]["headGroupSpec"]["template"])[0]["image"]


def test_the_dockerfile_builds_the_named_image_from_files_that_exist():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray.__version__)}$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", text, re.M)
    assert "paddlepaddle-gpu==${PADDLE_VERSION}" in text
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = [w for w in line.split() if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
    result = subprocess.run(["bash", "-n", str(CLUSTER / "nightly_audit_cron.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_example_audit_config_loads():
    cfg = audit_run.load_config(str(CLUSTER / "audit.example.yaml"))
    assert cfg.source.startswith("s3://") and cfg.models.endswith("registry.yaml")
    assert cfg.scoring.gpus_per_actor == 1 and cfg.partitions[0] == "category"


@pytest.mark.parametrize("expr, ok", [("15 2 * * *", True), ("*/5 0-6 1,15 * 1-5", True),
                                      ("60 2 * * *", False), ("15 2 * *", False), ("a b c d e", False)])
def test_cron_check(expr, ok):
    assert _cron_ok(expr) is ok


def test_the_rayservice_deploys_the_serving_app_builder(manifests):
    """The RayService's serveConfigV2 passes Ray Serve's own schema, names the app builder of
    `stfpm serve` with arguments it accepts (checked without loading models), autoscales GPU
    replicas on a GPU group that starts at zero, and runs the RayCluster's image with its auth."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from stfpm.serving.app import ServeOptions, parse_replicas

    service = manifests["RayService"]
    rc = manifests["RayCluster"]
    assert service["apiVersion"] == "ray.io/v1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    (application,) = config.applications
    module, name = application.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), name)) and name == "build_app"
    options = ServeOptions.from_args(application.args)
    assert options.model.startswith("s3://") and options.model.endswith("registry.yaml")
    low, high = parse_replicas(options.replicas)
    assert 1 <= low < high and options.gpus_per_replica >= 1 and application.route_prefix == "/"

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == rc["spec"]["authOptions"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"] and gpu["maxReplicas"] >= high * options.gpus_per_replica
    assert _containers(gpu["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == options.gpus_per_replica
    images = {c["image"] for t in (head["template"], gpu["template"]) for c in _containers(t)}
    assert images == {_containers(rc["spec"]["headGroupSpec"]["template"])[0]["image"]}
    for template in (head["template"], gpu["template"]):
        assert template["spec"]["serviceAccountName"] == manifests["ServiceAccount"]["metadata"]["name"]
        assert {p["name"]: p["containerPort"] for p in _containers(template)[0]["ports"]}["serve"] == 8000
