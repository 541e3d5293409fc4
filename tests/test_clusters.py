"""Cluster launcher YAMLs and KubeRay manifests under clusters/.

The shipped files are checked against oracles that do not go through
clusters/validate.py: Ray's schema via ``jsonschema.validate`` and Ray's own
``prepare_config``/``validate_config``, and plain reads of the YAML fields.
Then each rule of clusters/validate.py is shown to reject a file broken in
memory in the way the rule is about, so a wrong YAML fails the check.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml", "cpu-small.yaml"]
# Every launcher YAML in clusters/ gets the generic checks, including ones added later.
ALL_LAUNCHERS = sorted(p.name for p in CLUSTERS.glob("*.yaml"))
ALL_MANIFESTS = sorted(CLUSTERS.glob("kuberay/*.yaml"))
GPU_LAUNCHERS = ["aws-gpu.yaml", "gcp-gpu.yaml"]
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"


def _load_validate():
    spec = importlib.util.spec_from_file_location("pointseg_clusters_validate", CLUSTERS / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V = _load_validate()


def load(name: str | Path) -> dict:
    path = name if isinstance(name, Path) else CLUSTERS / name
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: validation must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during offline validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def head_and_workers(cfg: dict) -> tuple[dict, dict]:
    head = cfg["available_node_types"][cfg["head_node_type"]]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    return head, workers


# ------------------------------------------------------------- shipped launcher YAMLs


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_launcher_matches_ray_schema(name):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load(name), schema)  # raises on any violation


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_launcher_passes_ray_offline_validation(name, no_network):
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    # prepare_config merged the provider defaults and kept our choices.
    assert prepared["available_node_types"][prepared["head_node_type"]]["resources"] == {"CPU": 0}
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_project_rules_read_directly(name):
    cfg = load(name)
    head, workers = head_and_workers(cfg)
    assert head["resources"]["CPU"] == 0
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-py311-")
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup and " -e ." in setup
    scheme = {"aws": "s3://", "gcp": "gs://"}[cfg["provider"]["type"]]
    exports = [c for c in cfg["setup_commands"] if "POINTSEG_STORAGE=" in c]
    assert len(exports) == 1 and f"POINTSEG_STORAGE={scheme}" in exports[0]
    for remote, local in cfg["file_mounts"].items():
        if local.startswith("./"):
            assert (REPO / local).exists(), (remote, local)
    assert workers and all(w["max_workers"] >= w.get("min_workers", 0) for w in workers.values())


@pytest.mark.parametrize("name", GPU_LAUNCHERS)
def test_gpu_launchers_have_gpu_workers_only(name):
    cfg = load(name)
    head, workers = head_and_workers(cfg)
    assert "GPU" not in head["resources"]
    assert [k for k, w in workers.items() if w["resources"].get("GPU", 0) >= 1], "no GPU worker type"
    assert cfg["docker"]["image"].endswith("-gpu")


def test_cpu_small_offers_no_gpu():
    cfg = load("cpu-small.yaml")
    assert all(not t["resources"].get("GPU") for t in cfg["available_node_types"].values())
    assert cfg["provider"]["type"] == "aws"
    assert all(t["node_config"]["InstanceType"].startswith("m5.") for t in cfg["available_node_types"].values())


@pytest.mark.parametrize("name", ALL_LAUNCHERS)
def test_validate_accepts_shipped_launcher(name, no_network):
    assert V.launcher_errors(load(name)) == []


# ---------------------------------------------------- launcher YAMLs broken in memory


def _aws() -> dict:
    return load("aws-gpu.yaml")


def _gcp() -> dict:
    return load("gcp-gpu.yaml")


def test_rejects_misspelled_top_level_key():
    cfg = _aws()
    cfg["max_worker"] = cfg.pop("max_workers")
    errors = V.schema_errors(cfg)
    assert any("max_worker" in e and "Additional properties" in e for e in errors), errors
    assert V.launcher_errors(cfg)


def test_rejects_max_workers_of_wrong_type():
    cfg = _aws()
    cfg["max_workers"] = "eight"
    assert any(e.startswith("max_workers:") for e in V.schema_errors(cfg))
    cfg["max_workers"] = -1
    assert any(e.startswith("max_workers:") for e in V.schema_errors(cfg))


def test_rejects_fractional_resources():
    cfg = _aws()
    cfg["available_node_types"]["worker.gpu.g5"]["resources"]["CPU"] = 7.5
    assert any("resources.CPU" in e for e in V.schema_errors(cfg))


def test_rejects_missing_head_node_type():
    cfg = _aws()
    del cfg["head_node_type"]
    assert V.schema_errors(cfg) == []  # the schema alone lets this through ...
    assert V.ray_offline_errors(cfg)  # ... Ray's validate_config does not
    assert any(e.startswith("head_node_type") for e in V.project_rule_errors(cfg))


def test_rejects_head_node_type_not_among_types():
    cfg = _aws()
    cfg["head_node_type"] = "head.gpu"
    assert any("head_node_type" in e for e in V.ray_offline_errors(cfg))


def test_rejects_min_workers_above_max_workers():
    cfg = _aws()
    cfg["available_node_types"]["worker.gpu.g5"]["min_workers"] = 9
    assert V.schema_errors(cfg) == []
    assert any("min_workers" in e for e in V.ray_offline_errors(cfg))


def test_rejects_head_with_cpus():
    cfg = _aws()
    cfg["available_node_types"]["head.cpu"]["resources"] = {"CPU": 8}
    assert V.schema_errors(cfg) == [] and V.ray_offline_errors(cfg) == []
    errors = V.project_rule_errors(cfg)
    assert any("head.cpu.resources.CPU" in e for e in errors), errors
    del cfg["available_node_types"]["head.cpu"]["resources"]["CPU"]  # absent = autodetected = not 0
    assert any("head.cpu.resources.CPU" in e for e in V.project_rule_errors(cfg))


def test_rejects_gpu_instance_without_gpu_resource():
    cfg = _aws()
    del cfg["available_node_types"]["worker.gpu.g5"]["resources"]["GPU"]
    assert any("worker.gpu.g5.resources.GPU" in e for e in V.project_rule_errors(cfg))
    cfg = _gcp()
    del cfg["available_node_types"]["worker_gpu_t4"]["resources"]["GPU"]
    assert any("worker_gpu_t4.resources.GPU" in e for e in V.project_rule_errors(cfg))


def test_rejects_gpu_resource_on_cpu_instance():
    cfg = load("cpu-small.yaml")
    cfg["available_node_types"]["worker.cpu.m5"]["resources"]["GPU"] = 1
    assert any("worker.cpu.m5.resources.GPU" in e for e in V.project_rule_errors(cfg))


def test_rejects_gce_gpu_without_terminate_on_maintenance():
    cfg = _gcp()
    cfg["available_node_types"]["worker_gpu_t4"]["node_config"]["scheduling"] = [{"preemptible": True}]
    assert any("onHostMaintenance" in e for e in V.project_rule_errors(cfg))


@pytest.mark.parametrize(
    "image", ["rayproject/ray:2.9.0-py311-gpu", "rayproject/ray:latest-gpu", "rayproject/ray:2.60.1-py311-gpu"]
)
def test_rejects_other_ray_image(image):
    cfg = _aws()
    cfg["docker"]["image"] = image
    assert any(e.startswith("docker.image") for e in V.project_rule_errors(cfg))


def test_ray_pin_by_pip_instead_of_image():
    cfg = load("cpu-small.yaml")
    del cfg["docker"]
    assert any("not pinned" in e for e in V.project_rule_errors(cfg))
    cfg["setup_commands"].insert(0, 'pip install "ray[default,data,train,tune]==2.60.0"')
    assert V.project_rule_errors(cfg) == []
    cfg["setup_commands"][0] = 'pip install "ray[default]==2.59.0"'
    assert any("ray==2.59.0" in e for e in V.project_rule_errors(cfg))


def test_rejects_missing_torch_pin_and_pointseg_install():
    cfg = _aws()
    cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "torch" not in c and "-e ." not in c]
    errors = V.project_rule_errors(cfg)
    assert any("torch==2.14.1" in e for e in errors) and any("install pointseg" in e for e in errors)


@pytest.mark.parametrize(
    "name, uri", [("aws-gpu.yaml", "gs://b/p"), ("gcp-gpu.yaml", "s3://b/p"), ("aws-gpu.yaml", "/mnt/local")]
)
def test_rejects_storage_on_wrong_scheme(name, uri):
    cfg = load(name)
    cfg["setup_commands"] = [
        f"echo 'export POINTSEG_STORAGE={uri}' >> ~/.bashrc" if "POINTSEG_STORAGE" in c else c
        for c in cfg["setup_commands"]
    ]
    assert any("POINTSEG_STORAGE" in e for e in V.project_rule_errors(cfg))


def test_rejects_missing_storage():
    cfg = _aws()
    cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "POINTSEG_STORAGE" not in c]
    assert any("POINTSEG_STORAGE" in e for e in V.project_rule_errors(cfg))


def test_rejects_auth_mode_on_head_only():
    cfg = _aws()
    cfg["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token ", "") for c in cfg["worker_start_ray_commands"]]
    assert any("RAY_AUTH_MODE" in e for e in V.project_rule_errors(cfg))


def test_rejects_file_mount_source_missing(tmp_path):
    cfg = _aws()
    cfg["file_mounts"]["~/pointseg/extra"] = "./no_such_dir"
    assert any("no_such_dir" in e for e in V.project_rule_errors(cfg))
    # Same YAML against an empty "repo": every relative source is missing.
    assert sum("does not exist" in e for e in V.project_rule_errors(_aws(), tmp_path)) == 5


# ------------------------------------------------------------------ KubeRay manifests


def _gpu_group(doc: dict) -> dict:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["workerGroupSpecs"][0]


def test_rayjob_fields_read_directly():
    job = load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and "torch==2.14.1" in env["pip"]["packages"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "flows/full_pipeline.py"]
    assert argv[argv.index("--config") + 1] == "configs/full_pipeline.yaml"
    assert argv[argv.index("--output") + 1].startswith("s3://")
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_rayjob_entrypoint_files_exist_in_repo():
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    assert (REPO / argv[1]).is_file(), f"{argv[1]} is missing from the repo"
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{config} is missing from the repo"


def test_raycluster_fields_read_directly():
    rc = load(RAYCLUSTER)
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu = rc["spec"]["workerGroupSpecs"][0]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["rayStartParams"]["num-gpus"] == "1"


def test_validate_accepts_shipped_manifests():
    assert set(ALL_LAUNCHERS) >= set(LAUNCHERS) and set(ALL_MANIFESTS) >= {RAYJOB, RAYCLUSTER}
    assert V.rayjob_errors(load(RAYJOB)) == []
    assert V.raycluster_errors(load(RAYCLUSTER)) == []
    for path in ALL_MANIFESTS:
        assert V.validate_file(path) == [], path


def test_rayjob_runtime_env_matches_pyproject():
    env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert V.runtime_env_pip_errors(env["pip"], REPO / "pyproject.toml") == []
    dropped = {**env["pip"], "packages": [p for p in env["pip"]["packages"] if not p.startswith("numpy")]}
    assert any("numpy" in e for e in V.runtime_env_pip_errors(dropped, REPO / "pyproject.toml"))
    repinned = ["torch==2.5.0" if p.startswith("torch==") else p for p in env["pip"]["packages"]]
    other_pin = {**env["pip"], "packages": repinned}
    assert any("torch" in e for e in V.runtime_env_pip_errors(other_pin, REPO / "pyproject.toml"))


def _rayjob_mutations():
    def drop(key):
        return lambda d: d["spec"].pop(key)

    def setk(key, value):
        return lambda d: d["spec"].__setitem__(key, value)

    def env(text):
        return setk("runtimeEnvYAML", text)

    def group(fn):
        return lambda d: fn(_gpu_group(d))

    def head(fn):
        return lambda d: fn(d["spec"]["rayClusterSpec"]["headGroupSpec"])

    def limits(d):
        return _gpu_group(d)["template"]["spec"]["containers"][0]["resources"]["limits"]

    return {
        "missing entrypoint": (drop("entrypoint"), "spec.entrypoint"),
        "entrypoint script missing": (
            setk("entrypoint", "python flows/no_such_flow.py --config configs/full_pipeline.yaml --output s3://b/r"),
            "no_such_flow.py",
        ),
        "config missing": (
            setk("entrypoint", "python flows/full_pipeline.py --config configs/nope.yaml --output s3://b/r"),
            "configs/nope.yaml",
        ),
        "local output": (
            setk("entrypoint", "python flows/full_pipeline.py --config configs/full_pipeline.yaml --output out/run"),
            "--output",
        ),
        "wrong kind": (lambda d: d.__setitem__("kind", "RayJobs"), "kind"),
        "wrong apiVersion": (lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"), "apiVersion"),
        "no name": (lambda d: d["metadata"].pop("name"), "metadata.name"),
        "misspelled spec key": (
            lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", d["spec"].pop("shutdownAfterJobFinishes")),
            "shutdownAfterJobFinish",
        ),
        "shutdown false": (setk("shutdownAfterJobFinishes", False), "shutdownAfterJobFinishes"),
        "backoffLimit string": (setk("backoffLimit", "2"), "backoffLimit"),
        "backoffLimit missing": (drop("backoffLimit"), "backoffLimit"),
        "runtime env not yaml": (env("pip: [torch\nworking_dir: : :"), "runtimeEnvYAML"),
        "runtime env pip int": (env("pip: 5\nenv_vars: {POINTSEG_STORAGE: s3://b/p}"), "runtimeEnvYAML"),
        "runtime env unknown key": (env("pipp: [torch]\nenv_vars: {POINTSEG_STORAGE: s3://b/p}"), "pipp"),
        "runtime env local working_dir": (env("working_dir: .\nenv_vars: {POINTSEG_STORAGE: s3://b/p}"), "working_dir"),
        "runtime env no storage": (env("working_dir: s3://b/code.zip"), "POINTSEG_STORAGE"),
        "no cluster spec": (drop("rayClusterSpec"), "rayClusterSpec"),
        "rayVersion": (lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.9.0"), "rayVersion"),
        "head with cpus": (head(lambda h: h["rayStartParams"].__setitem__("num-cpus", "8")), "num-cpus"),
        "old head image": (
            head(lambda h: h["template"]["spec"]["containers"][0].__setitem__("image", "rayproject/ray:2.9.0-gpu")),
            "image",
        ),
        "num-gpus as int": (group(lambda g: g["rayStartParams"].__setitem__("num-gpus", 1)), "must be a string"),
        "num-gpus above limit": (group(lambda g: g["rayStartParams"].__setitem__("num-gpus", "2")), "num-gpus"),
        "gpu limit removed": (lambda d: limits(d).pop("nvidia.com/gpu"), "num-gpus"),
        "min above max": (group(lambda g: g.__setitem__("minReplicas", 9)), "minReplicas"),
        "cpu image on gpu workers": (
            group(lambda g: g["template"]["spec"]["containers"][0].__setitem__("image", "rayproject/ray:2.60.0-py311")),
            "CUDA",
        ),
        "no worker groups": (lambda d: d["spec"]["rayClusterSpec"].pop("workerGroupSpecs"), "workerGroupSpecs"),
    }


@pytest.mark.parametrize("case", sorted(_rayjob_mutations()))
def test_rayjob_mutation_is_rejected(case):
    mutate, needle = _rayjob_mutations()[case]
    doc = copy.deepcopy(load(RAYJOB))
    mutate(doc)
    errors = V.rayjob_errors(doc)
    assert errors, f"{case}: broken RayJob passed validation"
    assert any(needle in e for e in errors), (case, errors)


def test_raycluster_mutations_are_rejected():
    rc = load(RAYCLUSTER)
    bad = copy.deepcopy(rc)
    bad["spec"].pop("workerGroupSpecs")
    assert any("workerGroupSpecs" in e for e in V.raycluster_errors(bad))
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["rayStartParams"].pop("num-gpus")
    assert any("num-gpus" in e for e in V.raycluster_errors(bad))
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus")
    assert any("num-cpus" in e for e in V.raycluster_errors(bad))
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"].append(copy.deepcopy(bad["spec"]["workerGroupSpecs"][0]))
    assert any("used twice" in e for e in V.raycluster_errors(bad))


# -------------------------------------------------------------------------------- CLI


def test_cli_exit_status(tmp_path, capsys):
    files = [str(CLUSTERS / n) for n in ALL_LAUNCHERS] + [str(p) for p in ALL_MANIFESTS]
    assert V.main(files) == 0
    assert capsys.readouterr().out.count(": ok") == len(files)
    broken = _aws()
    broken["available_node_types"]["head.cpu"]["resources"]["CPU"] = 2
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert V.main([str(path), str(RAYJOB)]) == 1
    out = capsys.readouterr().out
    assert "broken.yaml: available_node_types.head.cpu.resources.CPU" in out and "rayjob.yaml: ok" in out


def test_cli_runs_as_script():
    proc = subprocess.run(
        [sys.executable, str(CLUSTERS / "validate.py"), str(CLUSTERS / "cpu-small.yaml"), str(RAYJOB)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 2


def test_readme_names_existing_files():
    text = (CLUSTERS / "README.md").read_text()
    for needle in ("ray up clusters/aws-gpu.yaml", "ray dashboard", "RAY_AUTH_MODE=token ray job submit",
                   "ray down", "kubectl apply -f clusters/kuberay/rayjob.yaml", "report.json", "storage_path"):
        assert needle in text, needle
    for rel in set(re.findall(r"clusters/[\w/.-]+\.(?:yaml|py)", text)):
        assert (REPO / rel).is_file(), rel
