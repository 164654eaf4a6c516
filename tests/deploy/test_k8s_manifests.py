"""deploy/k8s, validated statically: every manifest against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors), then what matters to Airlock — non-root, read-only root
filesystems, MIG slices per worker, Maverick on 8 GPUs, Redis for quotas, egress denied — the
commands in the manifests parsed by our own argument parsers, and each worker's settings file loaded
and checked by the worker's own loader."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control.cli import build_parser
from gateway import config as config_mod
from gateway.main import parse_route
from serving.settings import WorkerSettings
from worker.main import build_parser as worker_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.31.0"
MIG = re.compile(r"nvidia\.com/mig-\d+g\.\d+gb")


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


DOCS = [d for _, d in documents() if d["kind"] != "Kustomization"]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def by_name(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod(deployment)
    return [*spec.get("initContainers", []), *spec["containers"]]


def workers() -> list[dict[str, Any]]:
    return [
        d
        for d in of_kind("Deployment")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    ]


def worker_settings(deployment: dict[str, Any]) -> WorkerSettings:
    """The settings a worker pod runs with: its `--settings` file, from the ConfigMap mounted there."""
    [container] = pod(deployment)["containers"]
    args = worker_parser().parse_args(container["args"])  # the worker's own flags accept them
    [mount] = [m for m in container["volumeMounts"] if args.settings.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    config_map = by_name("ConfigMap", volume["configMap"]["name"])
    key = str(args.settings.relative_to(mount["mountPath"]))
    return WorkerSettings.from_json(config_map["data"][key], f"ConfigMap/{config_map['metadata']['name']}")


def gateway_config(tmp_path: Path) -> config_mod.Config:
    text = by_name("ConfigMap", "airlock-config")["data"]["airlock.toml"]
    text = text.replace('policy_dir = "/etc/airlock/policy"', f'policy_dir = "{ROOT / "policy"}"')
    for model_dir in re.findall(r'path = "(/models/[^"]+)"', text):  # model directories exist on the cluster
        text = text.replace(model_dir, str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "airlock.toml").write_text(text)
    return config_mod.load(tmp_path / "airlock.toml")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_each_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert doc["metadata"].get("namespace", "airlock") == "airlock"


def test_the_schema_check_catches_mistakes() -> None:
    broken = yaml.safe_load(yaml.safe_dump(by_name("Deployment", "airlock-gateway")))
    pod(broken)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_pods_run_non_root_with_a_read_only_root_filesystem(deployment: dict[str, Any]) -> None:
    spec = pod(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"] for v in spec["volumes"]}
    for container in containers(deployment):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes, container["name"]


def test_the_gateway_runs_several_replicas_routed_to_existing_workers() -> None:
    gateway = by_name("Deployment", "airlock-gateway")
    assert gateway["spec"]["replicas"] >= 2
    [container] = pod(gateway)["containers"]
    routes = [parse_route(a.split("=", 1)[1]) for a in container["args"] if a.startswith("--route=")]
    assert routes
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    for route in routes:
        host, port = route.address.rsplit(":", 1)
        service = services[host.split(".")[0]]
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        settings = worker_settings(by_name("Deployment", host.split(".")[0]))
        assert settings.tenant_names == (route.tenant,)  # the tenant's own worker
        assert (settings.model, settings.engine) == (route.model, route.engine)
        assert settings.listen.rsplit(":", 1)[1] == port
    for probe in ("readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["airlock", "health"]
        assert build_parser().parse_args(command[1:]).handler == "ops:cmd_health"


def test_redis_holds_the_shared_quota_state() -> None:
    redis = by_name("Deployment", "airlock-redis")
    assert any(p["containerPort"] == 6379 for p in pod(redis)["containers"][0]["ports"])
    assert by_name("Service", "airlock-redis")["spec"]["ports"][0]["port"] == 6379


def test_one_worker_per_mig_slice() -> None:
    mig = [
        w for w in workers() if any(MIG.fullmatch(r) for r in pod(w)["containers"][0]["resources"]["limits"])
    ]
    assert len(mig) >= 2
    for worker in mig:
        [container] = pod(worker)["containers"]
        limits = container["resources"]["limits"]
        slices = {r: n for r, n in limits.items() if r.startswith("nvidia.com/")}
        assert len(slices) == 1 and next(iter(slices.values())) == 1  # exactly one slice, no whole GPU
        assert worker["spec"]["replicas"] == 1 and worker["spec"]["strategy"]["type"] == "Recreate"
        settings = worker_settings(worker)
        assert settings.domain.device == "cuda" and settings.isolation == "dedicated"


def test_maverick_gets_an_eight_gpu_domain() -> None:
    [maverick] = [w for w in workers() if "maverick" in w["metadata"]["name"]]
    [container] = pod(maverick)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert not any(MIG.fullmatch(r) for r in container["resources"]["limits"])
    assert pod(maverick)["nodeSelector"]["nvidia.com/gpu.count"] == "8"
    settings = worker_settings(maverick)
    assert settings.engine == "vllm" and settings.domain.tensor_parallel_size == 8  # vLLM across all 8


def test_egress_is_denied_except_inside_the_namespace_and_dns() -> None:
    [deny] = [p for p in of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert deny["spec"]["policyTypes"] == ["Egress"]
    for rule in deny["spec"]["egress"]:
        for peer in rule["to"]:
            assert "ipBlock" not in peer  # no CIDR, so nothing outside the cluster
            if "namespaceSelector" in peer:  # the one way out of the namespace: cluster DNS
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "kube-system"
                }
                assert {p["port"] for p in rule["ports"]} == {53}
    workers_in = by_name("NetworkPolicy", "airlock-workers-ingress")["spec"]["ingress"]
    assert workers_in[0]["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}
    ]


def test_the_config_map_is_a_valid_airlock_configuration(tmp_path: Path) -> None:
    cfg = gateway_config(tmp_path)
    assert cfg.audit.fsync == "always" and cfg.audit.signing_key is not None
    assert cfg.bundles.require_signed and cfg.bundles.trusted_keys is not None


@pytest.mark.parametrize("deployment", workers(), ids=lambda d: d["metadata"]["name"])
def test_each_workers_settings_agree_with_the_gateways_configuration(
    deployment: dict[str, Any], tmp_path: Path
) -> None:
    """What `airlock up` derives from the configuration, these files must say by hand."""
    settings, cfg = worker_settings(deployment), gateway_config(tmp_path)
    assert settings.tenant_names == (deployment["metadata"]["labels"]["airlock.dev/tenant"],)
    limits = cfg.gateway.limits
    assert (settings.limits.max_tokens, settings.limits.default_max_tokens) == (
        limits.max_tokens, limits.default_max_tokens
    )  # fmt: skip
    assert settings.limits.max_message_bytes == cfg.gateway.max_message_bytes
    assert settings.hpke_suite == cfg.sealing.hpke_suite
    assert settings.bundles.require_signed and settings.bundles.trusted_keys == cfg.bundles.trusted_keys
    assert settings.bundles.signing_key is None  # no development key on a cluster
    mounts = pod(deployment)["containers"][0]["volumeMounts"]
    secrets = {v["name"] for v in pod(deployment)["volumes"] if "secret" in v}
    for path in (settings.tls.cert, settings.tls.key, settings.tls.client_ca, settings.bundles.trusted_keys,
                 *(p for t in settings.tenants for p in (t.attest_cert, t.attest_key))):  # fmt: skip
        [mount] = [m for m in mounts if path.is_relative_to(m["mountPath"])]
        assert mount["name"] in secrets and mount["readOnly"], path  # from a Secret, read-only
