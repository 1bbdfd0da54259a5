"""k8s/ validated offline: core kinds with kubernetes-validate (strict), the Ray and Multus
custom resources with the project's strict schemas (tests/k8s_schema.py), the policies the
issue sets (token auth, ClusterIP only, net1 via Multus + sbr, OTEL_* at the collector), and
kustomize rendering when a kustomize tool is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from supervisor.cli.fleet import add_fleet_commands
from tests.k8s_schema import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
SHARED_CRDS = ROOT.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.32"  # the API version the core kinds are checked against


def _docs() -> list[dict[str, Any]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _docs() if d["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = _kind(kind)
    return doc


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = Draft202012Validator(SCHEMAS[doc["kind"]])
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def _core_errors(doc: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


# -- schemas ---------------------------------------------------------------------------------------


def test_every_manifest_is_a_known_kind() -> None:
    kinds = {d["kind"] for d in _docs()}
    assert kinds == {
        "Namespace",
        "NetworkAttachmentDefinition",
        "ConfigMap",
        "Deployment",
        "Service",
        "RayCluster",
        "RayJob",
    }


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_custom_resources_match_the_strict_schema(kind: str) -> None:
    for doc in _kind(kind):
        assert _schema_errors(doc) == []


def test_core_kinds_pass_kubernetes_validate_strict() -> None:
    pytest.importorskip("kubernetes_validate")
    core = [d for d in _docs() if d["kind"] not in SCHEMAS]
    assert core
    for doc in core:
        assert _core_errors(doc) is None, doc["kind"]


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("RayCluster", ["spec"], ("authOptions", "authOption")),
        ("RayCluster", ["spec", "workerGroupSpecs", 0], ("rayStartParams", "rayStartParam")),
        ("RayCluster", ["spec", "headGroupSpec", "template", "spec"], ("containers", "contianers")),
        ("RayJob", ["spec"], ("clusterSelector", "clusterSelecter")),
        ("NetworkAttachmentDefinition", ["spec"], ("config", "conifg")),
    ],
)
def test_a_typo_in_a_custom_resource_fails(
    kind: str, path: list[Any], typo: tuple[str, str]
) -> None:
    doc = copy.deepcopy(_one(kind))
    node = doc
    for key in path:
        node = node[key]
    node[typo[1]] = node.pop(typo[0])
    assert _schema_errors(doc), f"{typo[1]} was accepted"


def test_a_typo_in_a_core_kind_fails() -> None:
    pytest.importorskip("kubernetes_validate")
    svc = copy.deepcopy(_kind("Service")[0])
    svc["spec"]["tpye"] = svc["spec"].pop("type")
    assert _core_errors(svc) is not None
    dep = copy.deepcopy(_one("Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert _core_errors(dep) is not None


def _strict(schema: Any) -> Any:
    """KubeRay's CRD schema with unknown fields rejected (as the API server prunes them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.mark.skipif(not SHARED_CRDS.is_dir(), reason="KubeRay CRDs not beside the repo (optional)")
@pytest.mark.parametrize(("kind", "crd"), [("RayCluster", "rayclusters"), ("RayJob", "rayjobs")])
def test_custom_resources_match_kuberays_crds(kind: str, crd: str) -> None:
    spec = yaml.safe_load((SHARED_CRDS / f"ray.io_{crd}.yaml").read_text())
    (version,) = [v for v in spec["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    validator = Draft202012Validator(schema)
    doc = _one(kind)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    typo = copy.deepcopy(doc)
    typo["spec"]["entrypointt" if kind == "RayJob" else "rayVersionn"] = "x"
    assert list(validator.iter_errors(typo))


# -- policies --------------------------------------------------------------------------------------


def test_control_plane_is_not_open() -> None:
    cluster = _one("RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for svc in _kind("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    assert not [d for d in _docs() if d["kind"] in ("Ingress", "Route")]
    # The job submitter reaches the job API with the cluster's token.
    secret = cluster["spec"]["authOptions"]["secretName"]
    env = _one("RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "RAY_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}


def test_workers_get_net1_through_multus_with_source_based_routing() -> None:
    nad = _one("NetworkAttachmentDefinition")
    config = json.loads(nad["spec"]["config"])
    types = [p["type"] for p in config["plugins"]]
    assert types[0] == "macvlan" and "sbr" in types
    (group,) = _one("RayCluster")["spec"]["workerGroupSpecs"]
    networks = json.loads(
        group["template"]["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
    )
    assert networks == [{"name": nad["metadata"]["name"], "interface": "net1"}]
    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]
    assert "k8s.v1.cni.cncf.io/networks" not in head.get("metadata", {}).get("annotations", {})


def test_workers_run_the_agent_and_export_to_the_collector() -> None:
    (group,) = _one("RayCluster")["spec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    hook = " ".join(container["lifecycle"]["postStart"]["exec"]["command"])
    assert "supervisor.cli.fleet agent" in hook
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    match = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"] or "")
    assert match is not None
    services = {s["metadata"]["name"]: s for s in _kind("Service")}
    collector = services[match.group(1)]
    assert int(match.group(2)) in [p["port"] for p in collector["spec"]["ports"]]


def test_drain_job_targets_the_cluster_and_parses_with_the_cli() -> None:
    job = _one("RayJob")
    cluster = _one("RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = job["spec"]["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "supervisor.cli.fleet"]
    import argparse

    parser = argparse.ArgumentParser()
    add_fleet_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv[3:])
    assert (args.command, args.fleet_command, args.device) == ("fleet", "drain", "net1")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    hook = group["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"]
    agent_argv = hook[-1].split(">")[0].split()[3:]
    agent = parser.parse_args(agent_argv)
    assert agent.command == "agent" and agent.namespace == args.namespace


def _exec_argv(command: list[str]) -> list[str]:
    """The quic-supervisor arguments of an exec command (``python -m supervisor.cli.main``)."""
    assert command[:3] == ["python", "-m", "supervisor.cli.main"], command
    return command[3:]


def test_worker_stop_and_probes_use_the_agents_socket_and_fit_the_grace_period() -> None:
    from supervisor.cli.main import build_parser

    (group,) = _one("RayCluster")["spec"]["workerGroupSpecs"]
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    hook = container["lifecycle"]["postStart"]["exec"]["command"][-1].split(">")[0].split()[3:]
    parser = argparse.ArgumentParser()
    add_fleet_commands(parser.add_subparsers(dest="command", required=True))
    agent = parser.parse_args(hook)
    assert agent.command == "agent" and agent.control_socket

    cli = build_parser()
    stop = cli.parse_args(_exec_argv(container["lifecycle"]["preStop"]["exec"]["command"]))
    assert (stop.command, stop.ctl_command, stop.socket) == ("ctl", "stop", agent.control_socket)
    # The stop and its client's wait end before kubelet's SIGKILL, with room for Ray's stop.
    grace = spec["terminationGracePeriodSeconds"]
    assert stop.deadline + stop.timeout + 15 <= grace, (stop.deadline, stop.timeout, grace)

    ready = cli.parse_args(_exec_argv(container["readinessProbe"]["exec"]["command"]))
    live = cli.parse_args(_exec_argv(container["livenessProbe"]["exec"]["command"]))
    for args, probe, which in (
        (ready, container["readinessProbe"], "ready"),
        (live, container["livenessProbe"], "live"),
    ):
        assert (args.command, args.ctl_command, args.socket) == (
            "ctl",
            "health",
            agent.control_socket,
        )
        assert getattr(args, which) and not getattr(args, {"ready": "live", "live": "ready"}[which])
        # The CLI gives up (exit 1, one line) before kubelet's own probe timeout.
        assert args.timeout < probe["timeoutSeconds"], (which, args.timeout, probe)
    liveness = container["livenessProbe"]
    # Lenient: a busy pod gets at least a minute of failed probes before it is restarted,
    # and the pod's start (raylet, then the agent: --wait) before the first probe counts.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
    assert liveness["initialDelaySeconds"] >= agent.wait


def test_images_match_the_pinned_ray_version() -> None:
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (ray_req,) = pin["ray"]
    low = re.search(r">=(\d+\.\d+)", ray_req)
    assert low is not None
    version = _one("RayCluster")["spec"]["rayVersion"]
    assert version.startswith(low.group(1) + ".")
    base = re.search(r"^FROM rayproject/ray:(\S+)", (K8S / "Dockerfile").read_text(), re.M)
    assert base is not None and base.group(1).split("-")[0] == version
    cluster = _one("RayCluster")["spec"]
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]]
    assert all(image.endswith(f"ray{version}") for image in images)


def test_kustomize_renders_everything_into_the_namespace() -> None:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip(
            "no kustomize tool: `kubectl` (Debian: kubernetes-client) or `kustomize` is not "
            "installed; PyPI's `kustomize` package is an unrelated library"
        )
    cmd = [kustomize, "build", str(K8S)] if kustomize else [str(kubectl), "kustomize", str(K8S)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {d["kind"] for d in docs} >= {"RayCluster", "NetworkAttachmentDefinition", "Service"}
    namespace = listed["namespace"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["kind"]
    for doc in docs:
        if doc["kind"] in SCHEMAS:
            assert _schema_errors(doc) == []
