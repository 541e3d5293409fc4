"""Offline checks for pointseg's Ray cluster launcher YAMLs and KubeRay manifests.

    python clusters/validate.py clusters/*.yaml clusters/kuberay/*.yaml

Exit status 0 when every file passes, 1 otherwise; each problem is printed on
one line naming the file and the field. Nothing here reaches a cloud or a
Kubernetes API.

A launcher YAML (no top-level ``kind``) passes three layers:

1. Ray's own schema, ``ray/autoscaler/ray-schema.json`` from the installed
   wheel, through ``jsonschema`` (unknown top-level keys, wrong types,
   negative worker counts, non-integer resources...).
2. The offline part of ``ray up``: ``prepare_config`` (merges the provider's
   ``defaults.yaml``, checks docker, fills per-type worker bounds) then
   ``validate_config`` (schema again, ``head_node_type`` among
   ``available_node_types``, sum of ``min_workers`` <= ``max_workers``).
   ``ray up`` calls the cloud only after these, in the provider's bootstrap.
3. pointseg's rules: the head offers ``CPU: 0``; Ray is pinned to 2.60.0 by
   the docker image or a pip pin, and nothing names another Ray version; the
   setup installs torch 2.14.1 / torchvision 0.29.1 and pointseg; a worker
   type declares ``GPU`` exactly when its instance has GPUs (a task asking
   ``num_gpus>0`` waits forever on a cluster that offers none); GCE GPU
   nodes terminate on host maintenance; ``POINTSEG_STORAGE`` is one
   ``s3://`` (AWS) or ``gs://`` (GCP) URI; head and workers agree on
   ``RAY_AUTH_MODE``; relative ``file_mounts`` sources exist in the repo.

A KubeRay manifest (``kind: RayJob`` or ``RayCluster``, ``apiVersion:
ray.io/v1``) is checked field by field: known spec keys, ``rayVersion`` and
images at 2.60.0, a head with ``num-cpus: "0"``, worker groups with
``0 <= minReplicas <= replicas <= maxReplicas``, string ``rayStartParams``,
``num-gpus`` equal to the pod's ``nvidia.com/gpu`` limit; for a RayJob also
the entrypoint (its script and ``--config`` exist in the repo, ``--output``
is s3:// or gs://), ``runtimeEnvYAML`` (parses, passes Ray's ``RuntimeEnv``
validation, remote ``working_dir``, pip list equal to pyproject's
dependencies minus Ray), ``shutdownAfterJobFinishes: true`` and an integer
``backoffLimit``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

RAY_VERSION = "2.60.0"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
REPO_ROOT = Path(__file__).resolve().parents[1]
STORAGE_VAR = "POINTSEG_STORAGE"
STORAGE_SCHEMES = {"aws": ("s3://",), "gcp": ("gs://",)}
# Packages a cluster needs beyond pyproject's dependencies: fsspec drivers for the bucket.
CLUSTER_ONLY_PACKAGES = {"s3fs", "gcsfs", "boto3"}

# EC2 families whose instances carry GPUs (NVIDIA or AMD); e.g. "g5.2xlarge" -> "g5".
AWS_GPU_FAMILIES = {
    "p2", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6",
    "g3", "g3s", "g4dn", "g4ad", "g5", "g5g", "g6", "g6e", "g6f", "gr6",
}
# GCE accelerator-optimised machine types come with GPUs attached.
GCP_GPU_MACHINE_PREFIXES = ("a2-", "a3-", "a4-", "g2-", "g4-")

# KubeRay ray.io/v1 field names (KubeRay >= 1.5). A key outside these is a typo
# that kubectl would silently drop (the CRDs prune unknown fields).
RAYJOB_SPEC_KEYS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_KEYS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
    "gcsFaultToleranceOptions", "authOptions", "upgradeStrategy",
}
HEAD_GROUP_KEYS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP_KEYS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy", "idleTimeoutSeconds", "suspend", "resources", "labels",
}

_RAY_PIN = re.compile(r"(?<![\w.-])ray(?:\[[^\]]*\])?\s*==\s*([0-9][\w.]*)")
_RAY_IMAGE = re.compile(r"^(?:[\w.-]+/)?rayproject/ray(?:-ml|-llm)?:(\S+)$")
_STORAGE = re.compile(STORAGE_VAR + r"=['\"]?([^\s'\"]+)")
_AUTH_MODE = re.compile(r"RAY_AUTH_MODE=['\"]?(\w+)")


# ----------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> Any:
    """Parse one YAML document with ``yaml.safe_load``."""
    with open(path) as f:
        return yaml.safe_load(f)


def ray_schema() -> dict:
    """The cluster-config JSON schema shipped in the installed Ray wheel."""
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


# ------------------------------------------------------------------ launcher: layers 1, 2


def schema_errors(config: Any) -> list[str]:
    """Violations of ``ray-schema.json`` (draft 7), one ``field.path: message`` each."""
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    out = []
    for e in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        out.append(f"{where}: {e.message}")
    return out


@contextlib.contextmanager
def _quiet_ray_logs():
    # prepare_config warns about file mounts that are files (cli_logger prints to
    # stdout) and logs per-type worker bounds; neither is a finding of this check.
    names = ["ray", "ray.autoscaler", "ray.autoscaler._private.docker", "ray.autoscaler._private.util"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def ray_offline_errors(config: Any) -> list[str]:
    """What ``ray up`` rejects before it calls the cloud: ``prepare_config`` + ``validate_config``.

    Both read only the config and the provider's ``defaults.yaml`` in the wheel
    (``ray.autoscaler._private.util``); the cloud is first contacted later, by
    ``provider_cls.bootstrap_config``, which is not called here.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet_ray_logs():
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except Exception as e:  # Ray raises ValueError, KeyError, AssertionError, ValidationError...
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        return [f"ray validate_config: {type(e).__name__}: {msg}"]
    return []


# -------------------------------------------------------------------- launcher: layer 3


def _commands(config: dict) -> list[str]:
    """Every shell command and docker option of the config, head, workers and per-type."""
    keys = (
        "initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands",
    )
    cmds: list[str] = []
    for k in keys:
        cmds += [c for c in config.get(k) or [] if isinstance(c, str)]
    docker = config.get("docker") or {}
    for k in ("run_options", "head_run_options", "worker_run_options"):
        cmds += [c for c in docker.get(k) or [] if isinstance(c, str)]
    for node in (config.get("available_node_types") or {}).values():
        if isinstance(node, dict):
            for k in ("initialization_commands", "worker_setup_commands"):
                cmds += [c for c in node.get(k) or [] if isinstance(c, str)]
    return cmds


def _images(config: dict) -> list[tuple[str, str]]:
    """(field, image) for every docker image the config names."""
    out = []
    docker = config.get("docker") or {}
    for k in ("image", "head_image", "worker_image"):
        if docker.get(k):
            out.append((f"docker.{k}", docker[k]))
    for name, node in (config.get("available_node_types") or {}).items():
        img = ((node or {}).get("docker") or {}).get("worker_image")
        if img:
            out.append((f"available_node_types.{name}.docker.worker_image", img))
    return out


def has_gpu_hardware(provider_type: str, node_config: dict) -> bool:
    """Whether the instance a ``node_config`` launches carries GPUs.

    AWS: by EC2 family of ``InstanceType`` (``g5.2xlarge`` -> ``g5``).
    GCP: any ``guestAccelerators`` with ``acceleratorCount > 0``, or an
    accelerator-optimised ``machineType`` (a2/a3/g2...).
    """
    if provider_type == "aws":
        family = str(node_config.get("InstanceType", "")).split(".")[0]
        return family in AWS_GPU_FAMILIES
    if provider_type == "gcp":
        accels = node_config.get("guestAccelerators") or []
        if any(int(a.get("acceleratorCount", 0) or 0) > 0 for a in accels if isinstance(a, dict)):
            return True
        return str(node_config.get("machineType", "")).startswith(GCP_GPU_MACHINE_PREFIXES)
    return False


def storage_uris(config: dict) -> list[str]:
    """Distinct ``POINTSEG_STORAGE=...`` values found in commands and docker options."""
    seen: list[str] = []
    for cmd in _commands(config):
        for uri in _STORAGE.findall(cmd):
            if uri not in seen:
                seen.append(uri)
    return seen


def project_rule_errors(config: Any, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """pointseg's rules for a launcher YAML (see the module docstring), one message each."""
    if not isinstance(config, dict):
        return ["<top level>: a cluster config must be a mapping"]
    errors: list[str] = []
    provider = (config.get("provider") or {}).get("type", "")
    types = config.get("available_node_types")
    head = config.get("head_node_type")
    if not isinstance(types, dict) or not types:
        errors.append("available_node_types: missing; pointseg clusters declare a head type and worker types")
        types = {}
    if head is None:
        errors.append("head_node_type: missing")
    elif head not in types:
        errors.append(f"head_node_type: {head!r} is not one of available_node_types {sorted(types)}")

    for name, node in types.items():
        node = node if isinstance(node, dict) else {}
        res = node.get("resources") if isinstance(node.get("resources"), dict) else {}
        where = f"available_node_types.{name}"
        if name == head:
            if res.get("CPU") != 0:
                errors.append(
                    f"{where}.resources.CPU: the head must offer CPU: 0 so work stays on workers"
                    f" (got {res.get('CPU')!r})"
                )
            if res.get("GPU", 0):
                errors.append(f"{where}.resources.GPU: the head must offer no GPU (got {res['GPU']!r})")
            continue
        gpu_hw = has_gpu_hardware(provider, node.get("node_config") or {})
        gpus = res.get("GPU", 0)
        if gpu_hw and not gpus:
            errors.append(
                f"{where}.resources.GPU: the instance has GPUs but the type declares none;"
                " GPU tasks would never be placed here"
            )
        if gpus and not gpu_hw:
            errors.append(
                f"{where}.resources.GPU: declares GPU: {gpus!r} on an instance without GPUs;"
                " a num_gpus>0 task placed here cannot run"
            )
        if provider == "gcp" and gpu_hw:
            sched = (node.get("node_config") or {}).get("scheduling") or []
            sched = sched if isinstance(sched, list) else [sched]
            if not any(isinstance(s, dict) and s.get("onHostMaintenance") == "TERMINATE" for s in sched):
                errors.append(f"{where}.node_config.scheduling: GCE GPU VMs need onHostMaintenance: TERMINATE")

    # Ray 2.60.0: pinned by an image tag or a pip pin, and nothing names another version.
    pins = []
    for field, image in _images(config):
        m = _RAY_IMAGE.match(image)
        if m:
            pins.append(image)
            if not (m.group(1) == RAY_VERSION or m.group(1).startswith(RAY_VERSION + "-")):
                errors.append(f"{field}: {image!r} is not Ray {RAY_VERSION}")
    cmds = _commands(config)
    for cmd in cmds:
        for version in _RAY_PIN.findall(cmd):
            pins.append(version)
            if version != RAY_VERSION:
                errors.append(f"setup commands: pin ray=={version}, expected ray=={RAY_VERSION}: {cmd!r}")
    if not pins:
        errors.append(
            f"docker.image / setup_commands: Ray is not pinned to {RAY_VERSION}"
            f" (use rayproject/ray:{RAY_VERSION}-... or ray=={RAY_VERSION})"
        )

    setup = " ; ".join(cmds)
    for pin in TORCH_PINS:
        if not re.search(re.escape(pin) + r"(?![\w.])", setup):
            errors.append(f"setup_commands: must install {pin}")
    if not re.search(r"pip install\b[^;&|]*\s-e\s", setup) and "pointseg @" not in setup:
        errors.append(
            "setup_commands: must install pointseg"
            ' (pip install -e . from the file_mounts copy, or "pointseg @ git+...")'
        )

    uris = storage_uris(config)
    allowed = STORAGE_SCHEMES.get(provider, ("s3://", "gs://"))
    if not uris:
        errors.append(f"setup_commands: no {STORAGE_VAR}=<{'|'.join(allowed)}...> for checkpoints and shards")
    elif len(uris) > 1:
        errors.append(f"setup_commands: {STORAGE_VAR} set to several values {uris}")
    for uri in uris:
        if not uri.startswith(allowed) or len(uri) <= len("s3://"):
            errors.append(
                f"setup_commands: {STORAGE_VAR}={uri!r} must be a {' or '.join(allowed)} URI"
                f" on a {provider or 'cloud'} cluster"
            )

    def auth_modes(key: str) -> set:
        return {m for c in config.get(key) or [] if isinstance(c, str) for m in _AUTH_MODE.findall(c)} or {None}

    head_auth, worker_auth = auth_modes("head_start_ray_commands"), auth_modes("worker_start_ray_commands")
    if head_auth != worker_auth:
        errors.append(
            f"worker_start_ray_commands: RAY_AUTH_MODE {sorted(map(str, worker_auth))} differs"
            f" from the head's {sorted(map(str, head_auth))}; workers could not join"
        )

    if repo_root is not None:
        for remote, local in (config.get("file_mounts") or {}).items():
            if isinstance(local, str) and not local.startswith(("~", "/")) and not (repo_root / local).exists():
                errors.append(f"file_mounts.{remote}: source {local!r} does not exist under {repo_root}")
    return errors


def launcher_errors(config: Any, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """All three layers for one launcher config; empty list when valid."""
    errors = schema_errors(config)
    if isinstance(config, dict):
        errors += ray_offline_errors(config)
    errors += project_rule_errors(config, repo_root)
    return errors


# ------------------------------------------------------------------------------ KubeRay


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _containers(template: Any) -> list[dict]:
    spec = (template or {}).get("spec") if isinstance(template, dict) else None
    containers = (spec or {}).get("containers") if isinstance(spec, dict) else None
    return [c for c in containers or [] if isinstance(c, dict)]


def _start_params_errors(params: Any, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams: required mapping (may be empty)"]
    return [
        f"{where}.rayStartParams.{k}: value {v!r} must be a string (KubeRay's map[string]string), e.g. {str(v)!r}"
        for k, v in params.items()
        if not isinstance(v, str)
    ]


def _image_errors(containers: list[dict], where: str) -> list[str]:
    errors = []
    for i, c in enumerate(containers):
        m = _RAY_IMAGE.match(str(c.get("image", "")))
        if m and not (m.group(1) == RAY_VERSION or m.group(1).startswith(RAY_VERSION + "-")):
            errors.append(f"{where}.template.spec.containers[{i}].image: {c.get('image')!r} is not Ray {RAY_VERSION}")
    if not containers or not _RAY_IMAGE.match(str(containers[0].get("image", ""))):
        errors.append(f"{where}.template.spec.containers[0].image: expected rayproject/ray:{RAY_VERSION}-...")
    return errors


def ray_cluster_spec_errors(spec: Any, where: str = "spec") -> list[str]:
    """Checks of a KubeRay ``RayClusterSpec`` (a RayCluster's spec or a RayJob's rayClusterSpec)."""
    if not isinstance(spec, dict):
        return [f"{where}: required mapping"]
    errors = [f"{where}.{k}: unknown RayClusterSpec field" for k in spec if k not in RAYCLUSTER_SPEC_KEYS]
    if str(spec.get("rayVersion")) != RAY_VERSION:
        errors.append(f"{where}.rayVersion: must be {RAY_VERSION!r} (got {spec.get('rayVersion')!r})")

    head = spec.get("headGroupSpec")
    hw = f"{where}.headGroupSpec"
    if not isinstance(head, dict):
        errors.append(f"{hw}: required mapping")
    else:
        errors += [f"{hw}.{k}: unknown HeadGroupSpec field" for k in head if k not in HEAD_GROUP_KEYS]
        errors += _start_params_errors(head.get("rayStartParams"), hw)
        params = head.get("rayStartParams") if isinstance(head.get("rayStartParams"), dict) else {}
        if params.get("num-cpus") != "0":
            errors.append(
                f'{hw}.rayStartParams.num-cpus: must be "0" so work stays on workers'
                f" (got {params.get('num-cpus')!r})"
            )
        containers = _containers(head.get("template"))
        if not containers:
            errors.append(f"{hw}.template.spec.containers: required, non-empty")
        errors += _image_errors(containers, hw)

    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        errors.append(f"{where}.workerGroupSpecs: required, non-empty list")
        groups = []
    names = set()
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(g, dict):
            errors.append(f"{gw}: must be a mapping")
            continue
        errors += [f"{gw}.{k}: unknown WorkerGroupSpec field" for k in g if k not in WORKER_GROUP_KEYS]
        name = g.get("groupName")
        if not isinstance(name, str) or not name:
            errors.append(f"{gw}.groupName: required string")
        elif name in names:
            errors.append(f"{gw}.groupName: {name!r} used twice")
        names.add(name)
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas")
        reps = g.get("replicas", lo)
        for key, v in (("minReplicas", lo), ("maxReplicas", hi), ("replicas", reps)):
            if _as_int(v) is None or isinstance(v, str):
                errors.append(f"{gw}.{key}: must be an integer (got {v!r})")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, reps)) and not 0 <= lo <= reps <= hi:
            errors.append(f"{gw}: need 0 <= minReplicas <= replicas <= maxReplicas (got {lo}, {reps}, {hi})")
        errors += _start_params_errors(g.get("rayStartParams"), gw)
        params = g.get("rayStartParams") if isinstance(g.get("rayStartParams"), dict) else {}
        containers = _containers(g.get("template"))
        if not containers:
            errors.append(f"{gw}.template.spec.containers: required, non-empty")
            continue
        errors += _image_errors(containers, gw)
        limits = ((containers[0].get("resources") or {}).get("limits")) or {}
        gpu_limit = _as_int(limits.get("nvidia.com/gpu", 0))
        num_gpus = params.get("num-gpus")
        if gpu_limit is None:
            errors.append(f"{gw}.template.spec.containers[0].resources.limits.nvidia.com/gpu: must be an integer")
        elif gpu_limit > 0:
            if num_gpus != str(gpu_limit):
                errors.append(
                    f'{gw}.rayStartParams.num-gpus: must be "{gpu_limit}" to match the'
                    f" nvidia.com/gpu limit (got {num_gpus!r})"
                )
            image = str(containers[0].get("image", ""))
            if _RAY_IMAGE.match(image) and "gpu" not in image and "-cu" not in image:
                errors.append(
                    f"{gw}.template.spec.containers[0].image: {image!r} has no CUDA;"
                    " use a -gpu tag on GPU workers"
                )
        elif num_gpus not in (None, "0"):
            errors.append(
                f"{gw}.rayStartParams.num-gpus: {num_gpus!r} without an nvidia.com/gpu limit;"
                " the pod has no GPU and GPU tasks would fail"
            )
    return errors


def _metadata_errors(doc: dict, kind: str) -> list[str]:
    errors = []
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion: must be 'ray.io/v1' (got {doc.get('apiVersion')!r})")
    if doc.get("kind") != kind:
        errors.append(f"kind: must be {kind!r} (got {doc.get('kind')!r})")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") or meta.get("generateName")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?-?", name):
        errors.append(f"metadata.name: required DNS-1123 name (got {name!r})")
    return errors


def raycluster_errors(doc: Any) -> list[str]:
    """Checks of a ``kind: RayCluster`` manifest."""
    if not isinstance(doc, dict):
        return ["<top level>: a manifest must be a mapping"]
    return _metadata_errors(doc, "RayCluster") + ray_cluster_spec_errors(doc.get("spec"), "spec")


def _requirement_key(req: str) -> tuple[str, str] | None:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        r = Requirement(req)
    except InvalidRequirement:
        return None
    return canonicalize_name(r.name), str(r.specifier)


def runtime_env_pip_errors(pip: Any, pyproject: Path) -> list[str]:
    """The RayJob's pip list must carry pyproject's dependencies (minus Ray) with the same pins.

    Extra packages are allowed only from ``CLUSTER_ONLY_PACKAGES`` (bucket drivers).
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: skip rather than guess
        return []
    where = "spec.runtimeEnvYAML.pip"
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if isinstance(packages, str) or not isinstance(packages, list):
        return [f"{where}: must list packages so every node gets pointseg's dependencies"]
    have = {}
    errors = []
    for p in packages:
        key = _requirement_key(str(p))
        if key is None:
            errors.append(f"{where}: {p!r} is not a valid requirement")
        else:
            have[key[0]] = key[1]
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    wanted = {}
    for d in deps:
        key = _requirement_key(d)
        if key and key[0] != "ray":
            wanted[key[0]] = key[1]
    for name, spec in wanted.items():
        if name not in have:
            errors.append(f"{where}: missing {name}{spec} from pyproject.toml")
        elif have[name] != spec:
            errors.append(f"{where}: {name}{have[name]} differs from pyproject.toml's {name}{spec}")
    for name in have:
        if name not in wanted and name not in CLUSTER_ONLY_PACKAGES:
            errors.append(f"{where}: {name} is not a pointseg dependency (add it to pyproject.toml first)")
    return errors


def runtime_env_errors(text: Any, pyproject: Path | None = None) -> list[str]:
    """``runtimeEnvYAML``: parses to a mapping Ray's ``RuntimeEnv`` accepts, for a remote cluster."""
    where = "spec.runtimeEnvYAML"
    if not isinstance(text, str):
        return [f"{where}: must be a YAML string (use `runtimeEnvYAML: |`)"]
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: does not parse as YAML: {e}"]
    if not isinstance(env, dict):
        return [f"{where}: must parse to a mapping (got {type(env).__name__})"]
    from ray.runtime_env import RuntimeEnv

    errors = [f"{where}.{k}: unknown runtime_env field" for k in env if k not in RuntimeEnv.known_fields]
    try:
        from ray.runtime_env.runtime_env import _validate_no_local_paths

        _validate_no_local_paths(RuntimeEnv(**env))
    except Exception as e:  # Ray's own field validation: TypeError / ValueError
        errors.append(f"{where}: {type(e).__name__}: {e}")
    wd = env.get("working_dir")
    if wd is not None and "://" not in str(wd):
        errors.append(
            f"{where}.working_dir: {wd!r} is a local path;"
            " a RayJob needs a remote URI (s3://, gs://, https://...zip)"
        )
    storage = (env.get("env_vars") or {}).get(STORAGE_VAR) if isinstance(env.get("env_vars"), dict) else None
    if not (isinstance(storage, str) and storage.startswith(("s3://", "gs://"))):
        errors.append(f"{where}.env_vars.{STORAGE_VAR}: must be an s3:// or gs:// URI (got {storage!r})")
    if pyproject is not None and pyproject.is_file():
        errors += runtime_env_pip_errors(env.get("pip"), pyproject)
    return errors


def entrypoint_errors(entrypoint: Any, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """``python flows/X.py --config configs/X.yaml --output s3://...``; the files exist in the repo."""
    where = "spec.entrypoint"
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        return [f"{where}: required command string"]
    try:
        argv = shlex.split(entrypoint)
    except ValueError as e:
        return [f"{where}: does not parse as a shell command: {e}"]
    errors = []
    if len(argv) < 2 or Path(argv[0]).name not in ("python", "python3") or not argv[1].endswith(".py"):
        return [f"{where}: expected 'python flows/NAME.py ...' (got {entrypoint!r})"]
    opts = {}
    for flag in ("--config", "--output"):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                opts[flag] = argv[i + 1]
            elif a.startswith(flag + "="):
                opts[flag] = a.split("=", 1)[1]
    if repo_root is not None:
        if not (repo_root / argv[1]).is_file():
            errors.append(f"{where}: script {argv[1]!r} does not exist under {repo_root}")
        if "--config" in opts and not (repo_root / opts["--config"]).is_file():
            errors.append(f"{where}: --config {opts['--config']!r} does not exist under {repo_root}")
    if "--config" not in opts:
        errors.append(f"{where}: pass --config configs/NAME.yaml")
    out = opts.get("--output")
    if not (isinstance(out, str) and out.startswith(("s3://", "gs://")) and len(out) > 5):
        errors.append(f"{where}: --output must be an s3:// or gs:// URI; a pod's disk goes away with it (got {out!r})")
    return errors


def rayjob_errors(doc: Any, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """Checks of a ``kind: RayJob`` manifest."""
    if not isinstance(doc, dict):
        return ["<top level>: a manifest must be a mapping"]
    errors = _metadata_errors(doc, "RayJob")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: required mapping"]
    errors += [f"spec.{k}: unknown RayJobSpec field" for k in spec if k not in RAYJOB_SPEC_KEYS]
    errors += entrypoint_errors(spec.get("entrypoint"), repo_root)
    pyproject = repo_root / "pyproject.toml" if repo_root is not None else None
    errors += runtime_env_errors(spec.get("runtimeEnvYAML"), pyproject)
    if spec.get("shutdownAfterJobFinishes") is not True:
        errors.append(
            "spec.shutdownAfterJobFinishes: must be true so the cluster is deleted after the run"
            f" (got {spec.get('shutdownAfterJobFinishes')!r})"
        )
    limit = spec.get("backoffLimit")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        errors.append(f"spec.backoffLimit: required integer >= 0 (got {limit!r})")
    if "rayClusterSpec" not in spec:
        errors.append("spec.rayClusterSpec: required (pointseg jobs bring their own cluster)")
    else:
        errors += ray_cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    return errors


# --------------------------------------------------------------------------------- CLI


def validate_document(doc: Any, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """Dispatch on ``kind``: RayJob, RayCluster, or (no kind) a launcher config."""
    if isinstance(doc, dict) and "kind" in doc:
        if doc["kind"] == "RayJob":
            return rayjob_errors(doc, repo_root)
        if doc["kind"] == "RayCluster":
            return raycluster_errors(doc)
        return [f"kind: {doc['kind']!r} is not RayJob or RayCluster"]
    return launcher_errors(doc, repo_root)


def validate_file(path: str | Path, repo_root: Path | None = REPO_ROOT) -> list[str]:
    """Every problem of one file, each prefixed with the file name."""
    try:
        doc = load_yaml(path)
    except (OSError, yaml.YAMLError) as e:
        return [f"{path}: {e}"]
    return [f"{path}: {msg}" for msg in validate_document(doc, repo_root)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="launcher YAMLs and KubeRay manifests")
    parser.add_argument(
        "--repo-root", type=Path, default=REPO_ROOT, help="where entrypoint scripts and file_mounts sources live"
    )
    args = parser.parse_args(argv)
    failed = 0
    for path in args.paths:
        errors = validate_file(path, args.repo_root)
        if errors:
            failed += 1
            print("\n".join(errors))
        else:
            print(f"{path}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
