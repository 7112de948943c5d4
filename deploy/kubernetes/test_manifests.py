"""Checks every manifest of deploy/kubernetes/, offline.

Run by `cargo test` (crates/pserver/tests/manifests.rs) in a venv of pinned
packages, with PSERVER_BIN naming the `pserver` binary of that build:

- Kubernetes objects are validated against the Kubernetes API's own
  object schemas (the `kubernetes-validate` package ships them as JSON
  Schema, in its strict form: an unknown field is an error), for the
  oldest and the newest Kubernetes version in VERSIONS.
- The TFJob is checked against the Kubeflow training operator's models
  (the `kubeflow-training` SDK: every field known, of its type, required
  ones present), its pod templates against the Kubernetes schema as
  above, and against the rules the operator itself applies (replica
  types, a container named "tensorflow" with a port "tfjob-port").
- What no schema knows: every PSERVER_* variable is one the command reads
  (from its --help), `$(VAR)` references name a variable set before,
  selectors match the pods' labels, probes and scrape annotations name
  declared ports and pserver's endpoints, files named by variables lie
  under a mounted volume, the Secrets used are the ones the README says
  how to create, and kustomization.yaml lists every manifest.

The negative cases at the end break a good manifest in one way each (a
typo'd field, a wrong type, a missing required field, ...) and see it
refused, so a checker that accepts everything fails here.
"""

import copy
import functools
import glob
import os
import re
import subprocess
import unittest

import kubernetes_validate
import kubernetes_validate.utils
import yaml
from kubeflow.training import models as kubeflow_models
from kubeflow.training.configuration import Configuration
from kubernetes.client import models as kubernetes_models

HERE = os.path.dirname(os.path.abspath(__file__))

# kubernetes-validate reads its schema files (1.8 MB of definitions) on
# every call; they do not change within a run.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)

# The oldest Kubernetes the manifests are meant for, and the newest whose
# schema the pinned kubernetes-validate ships.
VERSIONS = ("1.29", "1.37")

# Manifests not in kustomization.yaml: applied on their own.
STANDALONE = {"tfjob.yaml"}

# Variables that are no flag of a command.
NOT_FLAGS = {
    # The cluster secret itself (a file is better: PSERVER_SECRET_FILE).
    "PSERVER_SECRET",
}
# Variables of flags not in `pserver --help` yet (none now).
PENDING: set = set()

# What `pserver tfjob` may start: its variables are any of these roles'.
TFJOB_ROLES = ("tfjob", "manager", "server", "worker", "train")

# pserver's HTTP endpoints (served on --metrics-listen).
READY_PATH = "/readyz"
LIVE_PATH = "/healthz"
METRICS_PATH = "/metrics"

# The TFJob operator's replica types, its restart policies, and the
# container it gives TF_CONFIG and takes the port of.
TF_REPLICA_TYPES = {"Chief", "Master", "PS", "Worker", "Evaluator"}
TF_RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
TF_CONTAINER = "tensorflow"
TF_PORT = "tfjob-port"

WORKLOADS = {"StatefulSet", "Deployment", "Job", "DaemonSet", "ReplicaSet"}


class Invalid(Exception):
    """A manifest that would not be accepted, or would not work."""

    def __init__(self, where, message):
        super().__init__(f"{where}: {message}")


def load(path):
    """The documents of a YAML file, with their positions."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    return [(f"{os.path.basename(path)}[{i}]", d) for i, d in enumerate(docs)]


def manifests():
    """Every document of every manifest here, by file."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
        out[os.path.basename(path)] = load(path)
    return out


# --- Kubernetes objects -----------------------------------------------------


def check_object(where, doc):
    """Validates one Kubernetes object against the API's strict schema."""
    if not isinstance(doc, dict):
        raise Invalid(where, "not an object")
    for key in ("apiVersion", "kind"):
        if not isinstance(doc.get(key), str):
            raise Invalid(where, f"no {key}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise Invalid(where, "no metadata.name")
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise Invalid(f"{where} {path} (Kubernetes {version})", e.message)
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Invalid(where, e.message)


def check_pod_template(where, template):
    """A pod template, validated as the Kubernetes PodTemplate holding it."""
    check_object(
        where,
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "template"},
            "template": template,
        },
    )


# --- The TFJob, by the training operator's models ---------------------------

PRIMITIVES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),
    "datetime": (str,),
    "date": (str,),
}


def model_class(name):
    cls = getattr(kubeflow_models, name, None) or getattr(
        kubernetes_models, name, None
    )
    if cls is None:
        raise LookupError(f"no model {name}")
    return cls


def required(cls):
    """The fields a model's own setters refuse to leave unset."""
    probe = cls.__new__(cls)
    probe.local_vars_configuration = Configuration()
    out = []
    for attr in cls.openapi_types:
        try:
            setattr(probe, attr, None)
        except ValueError:
            out.append(attr)
    return out


def check_value(where, type_name, value):
    """`value` is of the model type `type_name` (as openapi_types spells it)."""
    if type_name == "V1PodTemplateSpec":
        check_pod_template(where, value)
        return
    m = re.fullmatch(r"list\[(.+)\]", type_name)
    if m:
        if not isinstance(value, list):
            raise Invalid(where, f"expected a list, got {value!r}")
        for i, v in enumerate(value):
            check_value(f"{where}[{i}]", m.group(1), v)
        return
    m = re.fullmatch(r"dict\(str, (.+)\)", type_name)
    if m:
        if not isinstance(value, dict):
            raise Invalid(where, f"expected a map, got {value!r}")
        for k, v in value.items():
            check_value(f"{where}.{k}", m.group(1), v)
        return
    if type_name in PRIMITIVES:
        kinds = PRIMITIVES[type_name]
        ok = isinstance(value, kinds) and not (
            isinstance(value, bool) and bool not in kinds and object not in kinds
        )
        if not ok:
            raise Invalid(where, f"expected {type_name}, got {value!r}")
        return
    check_model(where, model_class(type_name), value)


def check_model(where, cls, data):
    """`data` is a `cls`: no unknown field, required ones there, types right."""
    if not isinstance(data, dict):
        raise Invalid(where, f"expected an object ({cls.__name__}), got {data!r}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    for key in data:
        if key not in by_key:
            raise Invalid(f"{where}.{key}", f"unknown field of {cls.__name__}")
    for attr in required(cls):
        if data.get(cls.attribute_map[attr]) is None:
            raise Invalid(where, f"{cls.attribute_map[attr]} is required")
    for key, value in data.items():
        check_value(f"{where}.{key}", cls.openapi_types[by_key[key]], value)


def check_tfjob(where, doc):
    """A kubeflow.org/v1 TFJob, as the training operator would take it."""
    if doc.get("apiVersion") != "kubeflow.org/v1":
        raise Invalid(where, f"apiVersion {doc.get('apiVersion')!r}, not kubeflow.org/v1")
    check_model(where, kubeflow_models.KubeflowOrgV1TFJob, doc)
    specs = doc["spec"]["tfReplicaSpecs"]
    for rtype, spec in specs.items():
        at = f"{where} spec.tfReplicaSpecs.{rtype}"
        if rtype not in TF_REPLICA_TYPES:
            raise Invalid(at, f"no TFJob replica type (one of {sorted(TF_REPLICA_TYPES)})")
        policy = spec.get("restartPolicy")
        if policy is not None and policy not in TF_RESTART_POLICIES:
            raise Invalid(at, f"restartPolicy {policy!r}")
        if rtype in ("Chief", "Master") and spec.get("replicas", 1) != 1:
            raise Invalid(at, "a TFJob has one chief")
        containers = spec["template"]["spec"]["containers"]
        tf = [c for c in containers if c["name"] == TF_CONTAINER]
        if not tf:
            raise Invalid(at, f"no container named {TF_CONTAINER!r}: it alone gets TF_CONFIG")
        if not any(p.get("name") == TF_PORT for p in tf[0].get("ports", [])):
            raise Invalid(at, f"no port named {TF_PORT!r}: TF_CONFIG's port")
    if not ({"Chief", "Master"} & set(specs)) or "PS" not in specs:
        raise Invalid(where, "pserver needs a Chief (the manager) and PS replicas (servers)")


# --- What pserver needs of them ----------------------------------------------


_HELP = {}


def variables_of(command):
    """The variables `pserver COMMAND` reads, from its --help."""
    if command not in _HELP:
        out = subprocess.run(
            [os.environ["PSERVER_BIN"], command, "--help"],
            env={"PATH": os.environ.get("PATH", "")},
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        # (clap may wrap a line between "[env:" and the name.)
        _HELP[command] = set(re.findall(r"\[env:\s+([A-Z0-9_]+)", out))
        if not _HELP[command]:
            raise AssertionError(f"pserver {command} --help lists no variable:\n{out}")
    return _HELP[command]


def pod_templates(where, doc):
    """(where, pod template) of a workload or TFJob."""
    kind = doc.get("kind")
    if kind in WORKLOADS:
        yield where, doc["spec"]["template"]
    elif kind == "TFJob":
        for rtype, spec in doc["spec"]["tfReplicaSpecs"].items():
            yield f"{where} {rtype}", spec["template"]


def check_container(where, c, annotations):
    """A pserver container: its variables, references, probes and files."""
    command = list(c.get("command", [])) + list(c.get("args", []))
    if command[:1] != ["pserver"] or len(command) < 2:
        raise Invalid(where, f"runs {command!r}, not `pserver COMMAND`")
    sub = command[1]
    if not c.get("image"):
        raise Invalid(where, "no image (the schema allows that; a pod does not)")
    readable = set()
    for role in TFJOB_ROLES if sub == "tfjob" else (sub,):
        readable |= variables_of(role)
    if sub == "tfjob":
        # The chief's scheduler takes PSERVER_SCHEDULER_<X> as PSERVER_<X>.
        readable |= {v.replace("PSERVER_", "PSERVER_SCHEDULER_", 1) for v in readable}
    defined = set()
    env = {}
    for var in c.get("env", []):
        name = var["name"]
        for ref in re.findall(r"\$\(([A-Za-z0-9_]+)\)", str(var.get("value", ""))):
            if ref not in defined:
                raise Invalid(f"{where} env {name}", f"$({ref}) is not set before it")
        if name.startswith("PSERVER_") and name not in readable | NOT_FLAGS | PENDING:
            raise Invalid(f"{where} env {name}", f"`pserver {sub}` reads no such variable")
        defined.add(name)
        env[name] = var.get("value")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for kind, path in (("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)):
        probe = c.get(kind)
        if probe is None:
            continue
        get = probe.get("httpGet") or {}
        if get.get("path") != path:
            raise Invalid(f"{where} {kind}", f"path {get.get('path')!r}, not {path}")
        port = get.get("port")
        if isinstance(port, str) and port not in ports:
            raise Invalid(f"{where} {kind}", f"port {port!r} is not declared")
    if annotations.get("prometheus.io/scrape") == "true":
        port = annotations.get("prometheus.io/port")
        if port is None or int(port) not in ports.values():
            raise Invalid(where, f"prometheus.io/port {port!r} is no container port")
        if annotations.get("prometheus.io/path") != METRICS_PATH:
            raise Invalid(where, f"prometheus.io/path is not {METRICS_PATH}")
        listen = env.get("PSERVER_METRICS_LISTEN") or ""
        if not listen.endswith(f":{port}"):
            raise Invalid(where, f"PSERVER_METRICS_LISTEN {listen!r} is not the scraped port")
    mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
    for name, value in env.items():
        is_file = name.endswith("_FILE") or name.startswith("PSERVER_TLS_") or name == "PSERVER_STATE"
        if is_file and value and not any(value.startswith(m) for m in mounts):
            raise Invalid(f"{where} env {name}", f"{value} is on no mounted volume")


def check_pserver(where, doc):
    """The checks no schema makes, for one object."""
    meta = doc.get("metadata", {})
    kind = doc.get("kind")
    if kind in WORKLOADS and "selector" in doc["spec"]:
        # (A Job's selector is made by Kubernetes.)
        selector = doc["spec"]["selector"].get("matchLabels", {})
        labels = doc["spec"]["template"].get("metadata", {}).get("labels", {})
        for k, v in selector.items():
            if labels.get(k) != v:
                raise Invalid(f"{where} spec.selector", f"{k}={v} is not a label of its pods")
    for at, template in pod_templates(where, doc):
        annotations = template.get("metadata", {}).get("annotations", {})
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            check_container(f"{at} container {c['name']}", c, annotations)
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and not any(
                    t["metadata"]["name"] == m["name"]
                    for t in doc["spec"].get("volumeClaimTemplates", [])
                ):
                    raise Invalid(f"{at} container {c['name']}", f"mounts no volume {m['name']!r}")
    return meta


def secrets_used(doc):
    """The Secrets an object's pods mount."""
    out = set()
    for _, template in pod_templates("", doc):
        for v in template["spec"].get("volumes", []):
            if "secret" in v:
                out.add(v["secret"]["secretName"])
    return out


def check_set(files):
    """Across the manifests: names that must agree."""
    objects = [(w, d) for docs in files.values() for (w, d) in docs if d.get("kind") != "Kustomization"]
    services = {d["metadata"]["name"]: d for _, d in objects if d["kind"] == "Service"}
    pods = []
    for w, d in objects:
        for at, t in pod_templates(w, d):
            pods.append((at, d, t))
    for w, d in objects:
        if d["kind"] == "StatefulSet":
            svc = services.get(d["spec"]["serviceName"])
            if svc is None or svc["spec"].get("clusterIP") != "None":
                raise Invalid(w, f"serviceName {d['spec']['serviceName']!r} is no headless Service here")
    for at, d, t in pods:
        sub = t["spec"].get("subdomain")
        if sub is not None and (sub not in services or services[sub]["spec"].get("clusterIP") != "None"):
            raise Invalid(at, f"subdomain {sub!r} is no headless Service here")
    for name, svc in services.items():
        sel = svc["spec"].get("selector", {})
        matched = [
            t for _, _, t in pods
            if all(t.get("metadata", {}).get("labels", {}).get(k) == v for k, v in sel.items())
        ]
        if not matched:
            raise Invalid(f"Service {name}", f"its selector {sel} matches no pods here")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            declared = {
                q.get("name") if isinstance(target, str) else q["containerPort"]
                for t in matched for c in t["spec"]["containers"] for q in c.get("ports", [])
            }
            if target not in declared:
                raise Invalid(f"Service {name} port {p.get('name')}", f"targetPort {target!r} is no port of its pods")
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    for _, d in objects:
        for s in secrets_used(d):
            if f"kubectl create secret generic {s} " not in readme:
                raise Invalid(d["metadata"]["name"], f"the README does not say how to create Secret {s!r}")


def check_kustomization(files):
    """kustomization.yaml lists every manifest but the standalone ones, and
    its image is the one they use."""
    (_, k), = files["kustomization.yaml"]
    if k.get("kind") != "Kustomization":
        raise Invalid("kustomization.yaml", "not a Kustomization")
    listed = set(k.get("resources", []))
    wanted = set(files) - {"kustomization.yaml"} - STANDALONE
    if listed != wanted:
        raise Invalid("kustomization.yaml", f"resources {sorted(listed)}, but the manifests are {sorted(wanted)}")
    names = {i["name"] for i in k.get("images", [])}
    for f in listed | STANDALONE:
        for w, d in files[f]:
            for at, t in pod_templates(w, d):
                for c in t["spec"]["containers"]:
                    image = c.get("image", "").rsplit(":", 1)[0]
                    if image not in names:
                        raise Invalid(at, f"image {c['image']!r} is not kustomization.yaml's")


def check_document(where, doc):
    """Every check of one document."""
    if doc.get("kind") == "Kustomization":
        return
    if doc.get("kind") == "TFJob":
        check_tfjob(where, doc)
    else:
        check_object(where, doc)
    check_pserver(where, doc)


def check_all(files):
    for docs in files.values():
        for where, doc in docs:
            check_document(where, doc)
    check_set(files)
    check_kustomization(files)


# --- Tests --------------------------------------------------------------------


class Manifests(unittest.TestCase):
    def setUp(self):
        self.files = manifests()

    def doc(self, file, kind):
        for _, d in self.files[file]:
            if d["kind"] == kind:
                return d
        raise KeyError((file, kind))

    def test_every_manifest_is_valid(self):
        counted = {f: len(d) for f, d in self.files.items()}
        self.assertEqual(
            counted,
            {
                "kustomization.yaml": 1,
                "manager.yaml": 2,
                "servers.yaml": 2,
                "workers.yaml": 2,
                "train.yaml": 1,
                "tfjob.yaml": 1,
            },
        )
        check_all(self.files)

    def test_the_set_has_what_a_cluster_needs(self):
        manager = self.doc("manager.yaml", "StatefulSet")
        self.assertEqual(manager["spec"]["replicas"], 1)
        self.assertTrue(manager["spec"]["volumeClaimTemplates"])
        servers = self.doc("servers.yaml", "StatefulSet")
        self.assertEqual(self.doc("servers.yaml", "Service")["spec"]["clusterIP"], "None")
        self.assertEqual(servers["spec"]["serviceName"], "pserver-servers")
        tfjob = self.doc("tfjob.yaml", "TFJob")
        self.assertEqual(set(tfjob["spec"]["tfReplicaSpecs"]), {"Chief", "PS", "Worker"})

    # Each case breaks one thing and must be refused; `match` is in the
    # message, so the right check refused it.
    def refused(self, file, kind, breaks, match):
        files = copy.deepcopy(self.files)
        for i, (w, d) in enumerate(files[file]):
            if d["kind"] == kind:
                breaks(d)
                break
        with self.assertRaises(Invalid) as e:
            check_all(files)
        self.assertIn(match, str(e.exception))

    def test_a_typod_field_is_refused(self):
        def typo(d):
            d["spec"]["replica"] = d["spec"].pop("replicas")

        self.refused("servers.yaml", "StatefulSet", typo, "'replica' was unexpected")

    def test_a_typod_field_deep_in_a_pod_is_refused(self):
        def typo(d):
            d["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}

        self.refused("manager.yaml", "StatefulSet", typo, "'readinesProbe' was unexpected")

    def test_a_wrong_type_is_refused(self):
        def wrong(d):
            d["spec"]["replicas"] = "2"

        self.refused("servers.yaml", "StatefulSet", wrong, "is not of type 'integer'")

    def test_a_missing_required_field_is_refused(self):
        def missing(d):
            del d["spec"]["template"]["spec"]["containers"][0]["image"]

        self.refused("train.yaml", "Job", missing, "no image")

        def no_name(d):
            del d["spec"]["template"]["spec"]["containers"][0]["name"]

        self.refused("train.yaml", "Job", no_name, "'name' is a required property")

        def no_selector(d):
            del d["spec"]["selector"]

        self.refused("manager.yaml", "StatefulSet", no_selector, "'selector' is a required property")

    def test_an_unknown_kind_is_refused(self):
        def kind(d):
            d["kind"] = "StatefullSet"

        self.refused("servers.yaml", "StatefulSet", kind, "Couldn't find schema for kind StatefullSet")

    def test_a_typod_tfjob_field_is_refused(self):
        def typo(d):
            d["spec"]["tfReplicaSpec"] = d["spec"].pop("tfReplicaSpecs")

        self.refused("tfjob.yaml", "TFJob", typo, "spec.tfReplicaSpec: unknown field")

    def test_a_wrong_tfjob_type_is_refused(self):
        def wrong(d):
            d["spec"]["tfReplicaSpecs"]["PS"]["replicas"] = "2"

        self.refused("tfjob.yaml", "TFJob", wrong, "expected int, got '2'")

    def test_a_missing_tfjob_field_is_refused(self):
        def missing(d):
            del d["spec"]["runPolicy"]

        self.refused("tfjob.yaml", "TFJob", missing, "runPolicy is required")

    def test_a_broken_tfjob_pod_template_is_refused(self):
        def typo(d):
            c = d["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
            c["imagePullPolicyy"] = "Always"

        self.refused("tfjob.yaml", "TFJob", typo, "'imagePullPolicyy' was unexpected")

    def test_tfjob_rules_the_operator_applies_are_kept(self):
        def rename(d):
            d["spec"]["tfReplicaSpecs"]["PS"]["template"]["spec"]["containers"][0]["name"] = "ps"

        self.refused("tfjob.yaml", "TFJob", rename, "no container named 'tensorflow'")

        def rtype(d):
            specs = d["spec"]["tfReplicaSpecs"]
            specs["Ps"] = specs.pop("PS")

        self.refused("tfjob.yaml", "TFJob", rtype, "no TFJob replica type")

    def test_a_variable_pserver_does_not_read_is_refused(self):
        def typo(d):
            env = d["spec"]["template"]["spec"]["containers"][0]["env"]
            next(v for v in env if v["name"] == "PSERVER_MANAGER")["name"] = "PSERVER_MANAGR"

        self.refused("servers.yaml", "StatefulSet", typo, "reads no such variable")

        def train_only(d):
            # A training flag on a server.
            d["spec"]["template"]["spec"]["containers"][0]["env"].append(
                {"name": "PSERVER_EPOCHS", "value": "3"}
            )

        self.refused("servers.yaml", "StatefulSet", train_only, "`pserver server` reads no such variable")

    def test_an_unset_reference_is_refused(self):
        def ref(d):
            env = d["spec"]["template"]["spec"]["containers"][0]["env"]
            v = next(v for v in env if v["name"] == "PSERVER_ADVERTISE")
            v["value"] = v["value"].replace("$(POD_NAMESPACE)", "$(POD_NAMESPAC)")

        self.refused("servers.yaml", "StatefulSet", ref, "$(POD_NAMESPAC) is not set before it")

    def test_probes_and_scraping_must_name_pservers_endpoints(self):
        def path(d):
            c = d["spec"]["template"]["spec"]["containers"][0]
            c["readinessProbe"]["httpGet"]["path"] = "/ready"

        self.refused("servers.yaml", "StatefulSet", path, "not /readyz")

        def port(d):
            d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9091"

        self.refused("workers.yaml", "Job", port, "is no container port")

    def test_selectors_services_and_mounts_must_agree(self):
        def labels(d):
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "srv"

        self.refused("servers.yaml", "StatefulSet", labels, "is not a label of its pods")

        def service(d):
            d["spec"]["serviceName"] = "pserver-server"

        self.refused("servers.yaml", "StatefulSet", service, "no headless Service here")

        def mount(d):
            c = d["spec"]["template"]["spec"]["containers"][0]
            next(m for m in c["volumeMounts"] if m["name"] == "tls")["mountPath"] = "/etc/tls"

        self.refused("manager.yaml", "StatefulSet", mount, "is on no mounted volume")

    def test_kustomization_lists_every_manifest(self):
        files = copy.deepcopy(self.files)
        files["kustomization.yaml"][0][1]["resources"].remove("train.yaml")
        with self.assertRaises(Invalid) as e:
            check_all(files)
        self.assertIn("resources", str(e.exception))


if __name__ == "__main__":
    unittest.main(verbosity=2)
