"""Strict JSON schemas for the custom resources in k8s/: RayCluster, RayJob (ray.io/v1) and the
Multus NetworkAttachmentDefinition.

Why our own: the core-kinds validator from PyPI does not know these CRDs, and the project's
tests must not depend on KubeRay's CRD files. Each schema covers only the fields k8s/ uses and
sets ``additionalProperties: false`` everywhere, so a typo'd or unplanned field fails the test.
Field names and shapes follow KubeRay's ray.io/v1 CRDs (checked against them when available).
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def obj(required: list[str] | None = None, **props: Schema) -> Schema:
    """A closed object: only ``props`` are allowed."""
    out: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def array(items: Schema, min_items: int = 0) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items}


STR: Schema = {"type": "string", "minLength": 1}
INT: Schema = {"type": "integer"}
QUANTITY: Schema = {"anyOf": [{"type": "string", "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti)?$"}, INT]}
STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}

METADATA = obj(["name"], name=STR, namespace=STR, labels=STR_MAP, annotations=STR_MAP)

ENV_VAR = obj(
    ["name"],
    name=STR,
    value={"type": "string"},
    valueFrom=obj(
        fieldRef=obj(["fieldPath"], fieldPath=STR),
        secretKeyRef=obj(["name", "key"], name=STR, key=STR),
    ),
)

RESOURCES = obj(
    requests=obj(cpu=QUANTITY, memory=QUANTITY),
    limits=obj(cpu=QUANTITY, memory=QUANTITY),
)

EXEC = obj(["exec"], exec=obj(["command"], command=array(STR, 1)))
POSITIVE: Schema = {"type": "integer", "minimum": 1}
NON_NEGATIVE: Schema = {"type": "integer", "minimum": 0}

# Only exec probes: the agent answers on its Unix control socket (`ctl health`).
PROBE = obj(
    ["exec", "periodSeconds", "timeoutSeconds", "failureThreshold"],
    exec=obj(["command"], command=array(STR, 1)),
    initialDelaySeconds=NON_NEGATIVE,
    periodSeconds=POSITIVE,
    timeoutSeconds=POSITIVE,
    failureThreshold=POSITIVE,
    successThreshold=POSITIVE,
)

CONTAINER = obj(
    ["name", "image"],
    name=STR,
    image=STR,
    args=array(STR),
    command=array(STR),
    ports=array(obj(["containerPort"], name=STR, containerPort=INT)),
    env=array(ENV_VAR),
    resources=RESOURCES,
    lifecycle=obj(postStart=EXEC, preStop=EXEC),
    readinessProbe=PROBE,
    livenessProbe=PROBE,
    securityContext=obj(capabilities=obj(add=array(STR))),
)

POD_TEMPLATE = obj(
    ["spec"],
    metadata=obj(labels=STR_MAP, annotations=STR_MAP),
    spec=obj(
        ["containers"],
        containers=array(CONTAINER, 1),
        restartPolicy={"enum": ["Always", "OnFailure", "Never"]},
        terminationGracePeriodSeconds=NON_NEGATIVE,
    ),
)

# rayStartParams values are strings in ray.io/v1 (KubeRay turns them into `ray start` flags).
RAY_START_PARAMS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}

RAY_CLUSTER_SPEC = obj(
    ["headGroupSpec"],
    rayVersion={"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
    authOptions=obj(
        ["mode"],
        mode={"enum": ["disabled", "token"]},
        secretName=STR,
        enableK8sTokenAuth={"type": "boolean"},
    ),
    headGroupSpec=obj(
        ["template"],
        serviceType={"enum": ["ClusterIP"]},  # the control plane is not exposed: ClusterIP only
        rayStartParams=RAY_START_PARAMS,
        template=POD_TEMPLATE,
    ),
    workerGroupSpecs=array(
        obj(
            ["groupName", "minReplicas", "maxReplicas", "template"],
            groupName=STR,
            replicas=INT,
            minReplicas=INT,
            maxReplicas=INT,
            rayStartParams=RAY_START_PARAMS,
            template=POD_TEMPLATE,
        ),
        1,
    ),
)

RAY_CLUSTER: Schema = obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "ray.io/v1"},
    kind={"const": "RayCluster"},
    metadata=METADATA,
    spec=RAY_CLUSTER_SPEC,
)

RAY_JOB: Schema = obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "ray.io/v1"},
    kind={"const": "RayJob"},
    metadata=METADATA,
    spec=obj(
        ["entrypoint", "clusterSelector"],
        clusterSelector={
            "type": "object",
            "properties": {"ray.io/cluster": STR},
            "required": ["ray.io/cluster"],
            "additionalProperties": False,
        },
        entrypoint=STR,
        activeDeadlineSeconds=INT,
        submitterPodTemplate=POD_TEMPLATE,
    ),
)

NETWORK_ATTACHMENT_DEFINITION: Schema = obj(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "k8s.cni.cncf.io/v1"},
    kind={"const": "NetworkAttachmentDefinition"},
    metadata=METADATA,
    spec=obj(["config"], config=STR),
)

SCHEMAS: dict[str, Schema] = {
    "RayCluster": RAY_CLUSTER,
    "RayJob": RAY_JOB,
    "NetworkAttachmentDefinition": NETWORK_ATTACHMENT_DEFINITION,
}
