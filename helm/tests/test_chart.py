"""Chart tests with a real Helm engine (helm-python-sdk bundles Helm's Go SDK): lint,
render with the default values and with every option on, validate every rendered object
against the Kubernetes schemas (kubernetes-validate), and check what the agent needs.
Prints one line per check and closes with "chart: N passed, M failed"."""
import json
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


def render(values, name="proxy"):
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=name, namespace="kube-system", is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend((path, d) for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return [d for _, d in docs if d["kind"] == kind]


def render_error(values):
    try:
        render(values)
    except Exception as e:  # noqa: BLE001 - the engine's error is the message users see
        return str(e)
    return ""


# What a user must say: the image, and how agents reach the API server without kube-proxy.
MINIMAL = {"image": {"repository": "registry.example.com/ebpf-proxy"}, "k8sServiceHost": "10.0.0.10"}
check("no image: refused with the fix", "image.repository is required" in render_error({"k8sServiceHost": "10.0.0.10"}), render_error({"k8sServiceHost": "10.0.0.10"}))
error = render_error({"image": MINIMAL["image"]})
check("no API server address: refused with why", "set k8sServiceHost" in error and "new or rebooted node" in error, error)
for bad in [{"agent": {"xdp": "fast"}}, {"probes": {"port": 70000}}, {"agent": {"mapSizes": {"conntrak": 5}}}, {"agnet": {}}]:
    error = render_error({**MINIMAL, **bad})
    check(f"schema rejects {bad}", "schema" in error.lower() or "values don't meet" in error.lower(), error or "accepted")
(ds,) = [d for _, d in render(MINIMAL, name="ebpf-proxy") if d["kind"] == "DaemonSet"]
check("a release named like the chart is not doubled", ds["metadata"]["name"] == "ebpf-proxy", ds["metadata"]["name"])

for label, values in [("default", MINIMAL), ("all options", yaml.safe_load((CHART / "tests/values-all.yaml").read_text()))]:
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
    probes = {p: container[p]["httpGet"] for p in ["startupProbe", "livenessProbe", "readinessProbe"]}
    check(f"{label}: readiness on /readyz, startup and liveness on /livez, on the probe port", [h["path"] for h in probes.values()] == ["/livez", "/livez", "/readyz"] and all(h["port"] == "probes" for h in probes.values()), probes)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(f"{label}: probe port is not one of kube-proxy's", ports["probes"] not in (10249, 10256), ports)
    env = {e["name"]: e.get("value") for e in container["env"]}
    check(f"{label}: uninstall cleanup knows its DaemonSet", env.get("PROXY_OWNER_DAEMONSET") == f"kube-system/{ds['metadata']['name']}", env)
    init = {c["name"]: c for c in pod.get("initContainers", [])}
    check(f"{label}: bpffs mounted by an init container", init["mount-bpffs"]["volumeMounts"][0]["mountPropagation"] == "Bidirectional", init)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    check(f"{label}: bpffs and cgroup mounted", {"/sys/fs/bpf", values.get("agent", {}).get("cgroupPath", "/sys/fs/cgroup")} <= mounts, mounts)
    netns = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/netns"]
    check(f"{label}: pods' network namespaces visible, read-only, as they come", netns and netns[0].get("readOnly") and netns[0].get("mountPropagation") == "HostToContainer", netns)
    check(f"{label}: node name and IP from the downward API", {"NODE_NAME", "PROXY_NODE_IP"} <= env.keys(), env)
    (role,) = by_kind(docs, "ClusterRole")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    check(f"{label}: least-privilege RBAC", verbs == {"get", "list", "watch"} and resources == {"services", "nodes", "endpointslices"}, (verbs, resources))
    (own,) = by_kind(docs, "Role")
    check(f"{label}: may read its own DaemonSet only", own["rules"] == [{"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": [ds["metadata"]["name"]], "verbs": ["get"]}], own["rules"])
    (config,) = [c for c in by_kind(docs, "ConfigMap") if not c["metadata"]["name"].endswith("-dashboard")]
    check(f"{label}: agent settings in the ConfigMap", "PROXY_BPFFS" in config["data"] and "PROXY_HEALTHZ_BIND" in config["data"] and config["data"]["PROXY_PROBE_BIND"].endswith(f":{ports['probes']}"), config["data"])
    if label == "default":
        context = container["securityContext"]
        caps = context["capabilities"]["add"]
        check("default: the capabilities the agent tests run with, not privileged", context["privileged"] is False and sorted(caps) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"], caps)
        check("default: not in the host's PID namespace", "hostPID" not in pod, pod.keys())
        check("default: TCP connections keep a removed backend, as with kube-proxy", config["data"]["PROXY_DESTROY_TCP_TO_REMOVED_BACKENDS"] == "false", config["data"])
        check("default: AppArmor and seccomp unconfined (as the image check runs it), SELinux spc_t", context["appArmorProfile"] == {"type": "Unconfined"} and context["seccompProfile"] == {"type": "Unconfined"} and context["seLinuxOptions"] == {"type": "spc_t"}, context)
        check("default: API server address from k8sServiceHost", env.get("PROXY_K8S_API_SERVER") == "10.0.0.10:6443", env)
        check("default: no ServiceMonitor", not by_kind(docs, "ServiceMonitor"))
        check("default: no dashboard", len(by_kind(docs, "ConfigMap")) == 1)
        check("default: NodePorts on the primary address, as kube-proxy's nftables mode", config["data"]["PROXY_NODEPORT_ADDRESSES"] == "primary", config["data"])
        check("default: kube-proxy's rules left alone until asked", "cleanup-kube-proxy" not in init, init.keys())
    else:
        check("all options: map sizes passed to the agent", config["data"]["PROXY_MAP_SIZES"] == "conntrack=1048576,services=131072", config["data"])
        check("all options: ServiceMonitor and its Service", len(by_kind(docs, "ServiceMonitor")) == 1 and len(by_kind(docs, "Service")) == 1)
        (board,) = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
        dashboard = json.loads(board["data"]["ebpf-proxy.json"])
        check("all options: the Grafana dashboard, for the sidecar, where asked", board["metadata"]["labels"].get("grafana_dashboard") == "1" and board["metadata"]["namespace"] == "monitoring" and dashboard["uid"] == "ebpf-service-proxy", board["metadata"])
        check("all options: metrics bound for scraping", config["data"]["PROXY_METRICS_BIND"] == "0.0.0.0:9249")
        check("all options: XDP mode and interfaces passed to the agent", config["data"]["PROXY_XDP"] == "generic" and config["data"]["PROXY_XDP_INTERFACES"] == "eth0", config["data"])
        check("all options: NodePort addresses passed to the agent", config["data"]["PROXY_NODEPORT_ADDRESSES"] == "192.168.0.0/16,10.0.0.0/8", config["data"])
        check("all options: the host's PID namespace, where asked", pod.get("hostPID") is True, pod.keys())
        check("all options: TCP connections to removed backends destroyed", config["data"]["PROXY_DESTROY_TCP_TO_REMOVED_BACKENDS"] == "true", config["data"])
        check("all options: masquerade ports passed to the agent", config["data"]["PROXY_MASQUERADE_PORTS"] == "62000-65000", config["data"])
        check("all options: kube-proxy's rules removed by an init container", init["cleanup-kube-proxy"]["args"] == ["--cleanup-kube-proxy"], init)
        mounts_by_name = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        check("all options: API server address from the kubelet's kubeconfig", env.get("PROXY_K8S_API_SERVER_FROM") == mounts_by_name.get("kubelet-kubeconfig"), (env, mounts_by_name))
        check("all options: extra args, env, annotations, labels, affinity, update strategy", container["args"] == ["--xdp", "generic"] and env.get("RUST_BACKTRACE") == "1" and ds["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "network" and ds["spec"]["template"]["metadata"]["labels"]["example.com/tier"] == "node" and "nodeAffinity" in pod["affinity"] and ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "10%")
        check("all options: fullnameOverride", ds["metadata"]["name"] == "node-proxy", ds["metadata"]["name"])
        check("all options: JSON logs", config["data"]["PROXY_LOG_FORMAT"] == "json", config["data"])

passed = sum(results)
print(f"chart: {passed} passed, {len(results) - passed} failed")
sys.exit(0 if passed == len(results) else 1)
