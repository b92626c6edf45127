"""Chart tests with a real Helm engine (helm-python-sdk bundles Helm's Go SDK): lint,
render with the default values and with every option on, validate every rendered object
against the Kubernetes schemas (kubernetes-validate), and check what the agent needs.
Prints one line per check and closes with "chart: N passed, M failed"."""
import pathlib
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
KUBE_VERSION = "1.30.0"
results = []


def check(name, condition, detail=""):
    results.append(bool(condition))
    print(f"{'ok  ' if condition else 'FAIL'} {name}" + (f": {detail}" if detail and not condition else ""))


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="proxy", namespace="kube-system", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend((path, d) for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for _, d in docs if d["kind"] == kind]


for label, values in [("default", {}), ("all options", yaml.safe_load((CHART / "tests/values-all.yaml").read_text()))]:
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    check(f"{label}: helm lint --strict", not errors, errors)
    docs = render(values)
    for path, doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no built-in schema
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            check(f"{label}: {doc['kind']} {doc['metadata']['name']} matches the Kubernetes {KUBE_VERSION} schema", True)
        except Exception as e:  # noqa: BLE001 - report every validation failure
            check(f"{label}: {doc['kind']} {doc['metadata']['name']} matches the Kubernetes {KUBE_VERSION} schema", False, e)
    (ds,) = by_kind(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    check(f"{label}: hostNetwork", pod["hostNetwork"] is True)
    check(f"{label}: runs on every node", {"operator": "Exists"}.items() <= pod["tolerations"][0].items())
    check(f"{label}: readiness probe on /healthz", container["readinessProbe"]["httpGet"]["path"] == "/healthz")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    check(f"{label}: bpffs and cgroup mounted", {"/sys/fs/bpf", values.get("agent", {}).get("cgroupPath", "/sys/fs/cgroup")} <= mounts, mounts)
    env = {e["name"] for e in container["env"]}
    check(f"{label}: node name and IP from the downward API", {"NODE_NAME", "PROXY_NODE_IP"} <= env, env)
    (role,) = by_kind(docs, "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    check(f"{label}: least-privilege RBAC", verbs == {"get", "list", "watch"} and resources == {"services", "nodes", "endpointslices"}, (verbs, resources))
    (config,) = by_kind(docs, "ConfigMap")
    check(f"{label}: agent settings in the ConfigMap", "PROXY_BPFFS" in config["data"] and "PROXY_HEALTHZ_BIND" in config["data"])
    if label == "default":
        caps = container["securityContext"]["capabilities"]["add"]
        check("default: capabilities, not privileged", container["securityContext"]["privileged"] is False and "BPF" in caps and "NET_ADMIN" in caps, caps)
        check("default: no ServiceMonitor", not by_kind(docs, "ServiceMonitor"))
    else:
        check("all options: map sizes passed to the agent", config["data"]["PROXY_MAP_SIZES"] == "conntrack=1048576,services=131072", config["data"])
        check("all options: ServiceMonitor and its Service", len(by_kind(docs, "ServiceMonitor")) == 1 and len(by_kind(docs, "Service")) == 1)
        check("all options: metrics bound for scraping", config["data"]["PROXY_METRICS_BIND"] == "0.0.0.0:9249")
        check("all options: XDP mode and interfaces passed to the agent", config["data"]["PROXY_XDP"] == "generic" and config["data"]["PROXY_XDP_INTERFACES"] == "eth0", config["data"])
        check("all options: masquerade ports passed to the agent", config["data"]["PROXY_MASQUERADE_PORTS"] == "62000-65000", config["data"])

passed = sum(results)
print(f"chart: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
