"""deploy/k8s/ and deploy/compose.yaml, checked offline in milliseconds.

Every Kubernetes object validates against the API's own OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), and the things an
operator relies on hold: every daemon has readiness and liveness probes and
resource requests, runs as the images' non-root user, the join token and the
fleet secret come from Secrets, selectors select the pods they mean, and the
daemons' command lines use only flags the CLI knows.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests are meant for
UID = 10001  # the images' user (deploy/container/Containerfile)
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
# The one container allowed root: it hands the node's hostPath folders to UID.
CHOWN_INIT = "volume-permissions"


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, object) for every object in deploy/k8s (parsed once)."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return tuple(found)


def objects(kind: str | None = None) -> list[dict]:
    return [doc for _, doc in documents() if kind is None or doc["kind"] == kind]


def workloads() -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] in WORKLOADS]


def workload(name: str) -> dict:
    return next(w for w in workloads() if w["metadata"]["name"] == name)


def containers(work: dict, *, init: bool = False) -> list[dict]:
    spec = work["spec"]["template"]["spec"]
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def cli_flags() -> dict[str, set[str]]:
    """The flags `edgefleet node` and `edgefleet coordinator` accept, from their help."""
    flags = {}
    for command in ("node", "coordinator"):
        shown = subprocess.run(
            [sys.executable, "-m", "edgefleet", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        flags[command] = set(re.findall(r"(--[a-z][a-z0-9-]*)", shown))
    return flags


def used_flags(command_line: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command_line))


# --- schemas ---------------------------------------------------------------------------------


def test_every_object_validates_against_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the dev extra) is not installed"
    )
    assert {doc["kind"] for doc in objects()} >= {
        "Namespace",
        "Service",
        "StatefulSet",
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
    }
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {error.message}")


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert {image["name"] for image in kustomization["images"]} == {
        "edgefleet-node",
        "edgefleet-coordinator",
    }


# --- what an operator relies on --------------------------------------------------------------


def test_the_shape_of_the_fleet():
    assert workload("etcd")["kind"] == "StatefulSet"
    assert workload("etcd")["spec"]["replicas"] == 3
    coordinator = workload("edgefleet-coordinator")
    assert coordinator["kind"] == "Deployment" and coordinator["spec"]["replicas"] == 2
    node = workload("edgefleet-node")
    assert node["kind"] == "DaemonSet"
    assert node["spec"]["template"]["spec"]["nodeSelector"] == {"edgefleet.io/node": "true"}
    budgets = {pdb["metadata"]["name"] for pdb in objects("PodDisruptionBudget")}
    assert {"edgefleet-coordinator", "etcd"} <= budgets


def test_every_daemon_has_probes_and_resource_requests():
    for work in workloads():
        for container in containers(work):
            where = f"{work['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, where
            assert "memory" in container["resources"].get("limits", {}), where
        for container in containers(work, init=True):
            assert container.get("resources", {}).get("requests"), container["name"]


def test_edgefleet_probes_check_grpc_health_over_the_daemons_tls():
    """The node and coordinator speak TLS only: their probes run the image's
    grpc.health.v1 check, which uses the daemon's own certificate or CA."""
    node = containers(workload("edgefleet-node"))[0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = node[probe]["exec"]["command"]
        assert command[:2] == ["edgefleet-healthcheck", "node"], probe
    assert node["livenessProbe"]["exec"]["command"][-1] == "--live"  # draining is alive
    coordinator = containers(workload("edgefleet-coordinator"))[0]
    readiness = coordinator["readinessProbe"]["exec"]["command"]
    assert readiness == ["edgefleet-healthcheck", "coordinator"]
    assert coordinator["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    healthcheck = (ROOT / "deploy/container/healthcheck.py").read_text()
    assert "grpc_health.v1" in healthcheck
    containerfile = (ROOT / "deploy/container/Containerfile").read_text()
    assert "/opt/edgefleet/bin/edgefleet-healthcheck" in containerfile


def test_everything_runs_as_the_images_non_root_user():
    for work in workloads():
        pod = work["spec"]["template"]["spec"]
        name = work["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == UID, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), name
        for container in containers(work, init=True):
            context = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not context.get("privileged"), where
            if container["name"] == CHOWN_INIT:
                # Root only to chown the hostPath folders, with no other power.
                assert set(context["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}, where
                assert "chown" in " ".join(container["args"]), where
                continue
            assert context.get("runAsUser", UID) == UID, where
            assert context.get("runAsNonRoot", True) is True, where
            assert not context["capabilities"].get("add"), where
    inits = [
        c["name"]
        for w in workloads()
        for c in w["spec"]["template"]["spec"].get("initContainers", [])
    ]
    assert inits == [CHOWN_INIT]


def test_secrets_come_from_secret_objects_never_from_the_manifests():
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert "EF1." not in text, "a join token in a manifest"
    assert not objects("Secret"), "Secrets are made by the operator (README), not shipped"
    node = containers(workload("edgefleet-node"))[0]
    token = next(e for e in node["env"] if e["name"] == "EDGEFLEET_JOIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "edgefleet-join-token"
    assert "--join" not in " ".join(node["args"])
    coordinator = workload("edgefleet-coordinator")["spec"]["template"]["spec"]
    secret_volumes = {
        v["name"]: v["secret"]["secretName"] for v in coordinator["volumes"] if "secret" in v
    }
    assert secret_volumes == {"fleet-secret": "edgefleet-fleet-secret"}
    mount = next(
        m for m in coordinator["containers"][0]["volumeMounts"] if m["name"] == "fleet-secret"
    )
    assert mount["readOnly"] is True
    assert f"--fleet-secret-file={mount['mountPath']}/fleet-secret" in " ".join(
        coordinator["containers"][0]["args"]
    )


def test_selectors_select_the_pods_they_mean():
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads()}
    for work in workloads():
        assert matches(work["spec"]["selector"]["matchLabels"], pods[work["metadata"]["name"]])
    targets = {
        "etcd": "etcd",
        "edgefleet-coordinator": "edgefleet-coordinator",
    }
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in objects(kind):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            selected = [name for name, labels in pods.items() if matches(selector, labels)]
            assert selected == [targets[obj["metadata"]["name"]]], (kind, obj["metadata"])
    for policy in objects("NetworkPolicy"):
        protected = policy["spec"]["podSelector"]["matchLabels"]
        assert [name for name, labels in pods.items() if matches(protected, labels)] == ["etcd"]
        peers = {
            name
            for rule in policy["spec"]["ingress"]
            for source in rule["from"]
            for name, labels in pods.items()
            if matches(source["podSelector"]["matchLabels"], labels)
        }
        assert peers == {"etcd", "edgefleet-coordinator"}  # never the nodes
    # The StatefulSet's members are named through its headless Service.
    etcd = workload("etcd")
    service = next(
        s for s in objects("Service") if s["metadata"]["name"] == etcd["spec"]["serviceName"]
    )
    assert service["spec"]["clusterIP"] == "None"


def test_every_mount_has_a_volume_and_the_node_keeps_models_and_state():
    for work in workloads():
        spec = work["spec"]["template"]["spec"]
        names = {v["name"] for v in spec.get("volumes", [])}
        names |= {c["metadata"]["name"] for c in work["spec"].get("volumeClaimTemplates", [])}
        for container in containers(work, init=True):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in names, (work["metadata"]["name"], mount)
    node = workload("edgefleet-node")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in node["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in node["volumes"]}
    for path in ("/var/lib/edgefleet/models", "/var/lib/edgefleet/state"):
        assert "hostPath" in volumes[mounts[path]], path  # survives the pod, on the device


def test_the_daemons_command_lines_use_flags_the_cli_knows(cli_flags):
    node = containers(workload("edgefleet-node"))[0]
    assert node["args"][0] == "node"
    assert used_flags(" ".join(node["args"])) <= cli_flags["node"]
    coordinator = containers(workload("edgefleet-coordinator"))[0]
    script = coordinator["args"][0]
    assert "exec edgefleet coordinator" in script
    assert used_flags(script.split("exec edgefleet coordinator", 1)[1]) <= cli_flags["coordinator"]
    images = {c["image"].split(":")[0] for w in workloads() for c in containers(w, init=True)}
    assert images == {"edgefleet-node", "edgefleet-coordinator"}


# --- compose ---------------------------------------------------------------------------------


def test_the_compose_fleet_is_three_etcd_two_coordinators_two_nodes(cli_flags):
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    services = compose["services"]
    etcd = [s for s in services if s.startswith("etcd-")]
    coordinators = [s for s in services if s.startswith("coordinator-")]
    nodes = [s for s in services if s.startswith("node-")]
    assert (len(etcd), len(coordinators), len(nodes)) == (3, 2, 2)
    for name in coordinators:
        assert services[name]["image"].startswith("edgefleet-coordinator:")
        assert used_flags(" ".join(services[name]["command"])) <= cli_flags["coordinator"]
    for name in nodes:
        service = services[name]
        assert service["image"].startswith("edgefleet-node:")
        assert used_flags(" ".join(service["command"])) <= cli_flags["node"]
        # The token is made by the one-shot join-token service, never written here.
        assert "EF1." not in str(service)
        assert any(v.startswith("join:") for v in service["volumes"])
    assert "token create" in " ".join(services["join-token"]["entrypoint"])
    host = yaml.safe_load((ROOT / "deploy/compose.host.yaml").read_text())
    assert set(host["services"]) == set(services)
    for service in host["services"].values():
        assert service["network_mode"] == "host"
        assert {h.split(":")[0] for h in service["extra_hosts"]} >= set(coordinators + nodes)
