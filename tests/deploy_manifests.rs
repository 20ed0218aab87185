//! The Kubernetes manifests under `deploy/kubernetes` agree with the tokenproxy config they mount: every YAML
//! document parses; the config passes `tokenproxy check`; probes, ports, mounts, the grace period and the security
//! context match that config; the native-sidecar overlay really moves tokenproxy to a restartable init container;
//! the alerts have runbooks that exist; and every PromQL expression of the alerts and of the Grafana dashboard
//! (`deploy/grafana/tokenproxy.json`, whose panels must also have unique ids, the `${datasource}` variable and no
//! overlap) reads only metrics the registry registers, with only the labels those metrics have.
//!
//! No cluster is needed. When `kubectl` is on the PATH, `kubectl kustomize` also renders both variants.

mod support;

use support::metrics::{family, registered_metrics, Registered};
use support::{markdown, tokenproxy_command};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};
use tokenproxy::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

/// The alerts docs/metrics-and-alerts.md documents.
const REQUIRED_ALERTS: &[&str] = &[
    "TokenproxyTokenRefreshFailing",
    "TokenproxyTokenExpiringSoon",
    "TokenproxyIdpPermanentError",
    "TokenproxyReplaysStillUnauthorized",
];

/// The sidecar container's name in the pod.
const SIDECAR: &str = "tokenproxy";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn base_dir() -> PathBuf {
    kubernetes_dir().join("base")
}

fn workload_identity_dir() -> PathBuf {
    kubernetes_dir().join("workload-identity")
}

fn overlay_dir() -> PathBuf {
    kubernetes_dir().join("native-sidecar")
}

/// One YAML document, as JSON, with the file it came from.
struct Doc {
    file: PathBuf,
    value: Value,
}

/// Every `*.yaml` / `*.yml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every document of a YAML text (multi-document files included), as JSON.
fn parse_yaml(text: &str, origin: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"));
    docs.iter().map(|doc| to_json(doc, origin)).collect()
}

/// Every document of every YAML file under `dir`.
fn load_docs(dir: &Path) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in yaml_files(dir) {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for value in parse_yaml(&text, &file.display().to_string()) {
            docs.push(Doc { file: file.clone(), value });
        }
    }
    docs
}

fn to_json(yaml: &Yaml, origin: &str) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(text) => {
            let n: f64 = text.parse().unwrap_or_else(|_| panic!("{origin}: bad number {text}"));
            Value::from(n)
        }
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(|item| to_json(item, origin)).collect()),
        Yaml::Hash(hash) => {
            let mut map = Map::new();
            for (key, value) in hash {
                let key = match key {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("{origin}: unsupported mapping key {other:?}"),
                };
                map.insert(key, to_json(value, origin));
            }
            Value::Object(map)
        }
        Yaml::Alias(_) | Yaml::BadValue => panic!("{origin}: aliases and bad values are not used in the manifests"),
    }
}

/// The Kubernetes object of `kind` named `name`.
fn object<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|doc| &doc.value)
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes/base"))
}

fn objects<'a>(docs: &'a [Doc], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().map(|doc| &doc.value).filter(move |v| v["kind"] == kind)
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what}: expected a string, found {value}"))
}

fn array<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value.as_array().unwrap_or_else(|| panic!("{what}: expected a list, found {value}"))
}

fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    array(list, what).iter().find(|item| item["name"] == name).unwrap_or_else(|| panic!("{what}: no entry {name}"))
}

/// The base: its documents, the kustomization, the sidecar's config text and the resolved config.
struct Base {
    docs: Vec<Doc>,
    kustomization: Value,
    /// The TOML the ConfigMap is generated from.
    toml_text: String,
    toml: toml::Table,
    config: Config,
    /// Keeps the stand-in secret file alive while the test runs.
    _secret_dir: tempfile::TempDir,
}

impl Base {
    fn load() -> Base {
        let docs: Vec<Doc> = load_docs(&base_dir())
            .into_iter()
            .filter(|doc| doc.file.file_name().is_some_and(|name| name != "kustomization.yaml"))
            .collect();
        let kustomization = parse_yaml(&read(&base_dir().join("kustomization.yaml")), "base/kustomization.yaml")
            .into_iter()
            .next()
            .expect("base/kustomization.yaml has a document");
        let toml_file = config_map_generator_file(&kustomization);
        let toml_text = read(&base_dir().join(&toml_file));
        let toml: toml::Table = toml_text.parse().unwrap_or_else(|e| panic!("base/{toml_file}: invalid TOML: {e}"));
        let (config, secret_dir) = resolve_with_stand_in_secrets(&toml);
        Base { docs, kustomization, toml_text, toml, config, _secret_dir: secret_dir }
    }

    fn deployment(&self) -> &Value {
        let mut deployments = objects(&self.docs, "Deployment");
        let deployment = deployments.next().expect("the base has a Deployment");
        assert!(deployments.next().is_none(), "the base has one Deployment");
        deployment
    }

    fn pod_spec(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    fn sidecar(&self) -> &Value {
        named(&self.pod_spec()["containers"], SIDECAR, "Deployment containers")
    }

    /// The sidecar's volume mount whose directory holds `file`, and the pod volume it mounts.
    fn mount_of(&self, file: &str) -> (&Value, &Value) {
        let mount = array(&self.sidecar()["volumeMounts"], "tokenproxy volumeMounts")
            .iter()
            .find(|m| file.starts_with(&format!("{}/", str_of(&m["mountPath"], "mountPath").trim_end_matches('/'))))
            .unwrap_or_else(|| panic!("no volume of the tokenproxy container is mounted above {file}"));
        let volume_name = str_of(&mount["name"], "volumeMount name");
        (mount, named(&self.pod_spec()["volumes"], volume_name, "pod volumes"))
    }

    /// The admin port, as the probes must use it.
    fn admin_port(&self) -> u16 {
        self.config.admin.listen.port()
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The one file of the `tokenproxy-config` ConfigMap generator.
fn config_map_generator_file(kustomization: &Value) -> String {
    let generator = named(&kustomization["configMapGenerator"], "tokenproxy-config", "configMapGenerator");
    let files = array(&generator["files"], "configMapGenerator files");
    assert_eq!(files.len(), 1, "the tokenproxy-config ConfigMap holds exactly the config file");
    str_of(&files[0], "configMapGenerator file").to_owned()
}

/// The config with every `*_file` secret pointed at a stand-in file (the real paths exist only in the pod).
fn with_stand_in_secrets(toml: &toml::Table, dir: &Path) -> toml::Table {
    let mut toml = toml.clone();
    if let Some(toml::Value::Table(providers)) = toml.get_mut("providers") {
        for (name, provider) in providers.iter_mut() {
            let toml::Value::Table(provider) = provider else { continue };
            for key in ["client_secret_file", "refresh_token_file"] {
                if provider.contains_key(key) {
                    let stand_in = dir.join(format!("{name}-{key}"));
                    std::fs::write(&stand_in, "stand-in-secret\n").expect("write the stand-in secret");
                    provider.insert(key.to_owned(), toml::Value::String(stand_in.display().to_string()));
                }
            }
        }
    }
    toml
}

fn resolve_with_stand_in_secrets(toml: &toml::Table) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rewritten = with_stand_in_secrets(toml, dir.path());
    let text = toml::to_string(&rewritten).expect("config as TOML");
    let config = Config::from_toml_str(&text, "deploy/kubernetes/base/tokenproxy.toml")
        .unwrap_or_else(|e| panic!("the sidecar config is invalid:\n{e}"));
    (config, dir)
}

/// The port a probe or Service names, resolved against the container's named ports.
fn resolve_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).expect("a port number");
    }
    let name = str_of(port, "port");
    let port = named(&container["ports"], name, "container ports");
    u16::try_from(port["containerPort"].as_u64().expect("containerPort is a number")).expect("a port number")
}

fn seconds(duration: std::time::Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[test]
fn every_yaml_document_parses_and_is_an_object_or_a_json_patch() {
    let docs = load_docs(&kubernetes_dir());
    assert!(docs.len() >= 8, "expected the base's objects and the overlay, found {} documents", docs.len());
    for doc in &docs {
        let origin = doc.file.display();
        match &doc.value {
            Value::Object(object) if object.contains_key("kind") => {
                assert!(object.get("apiVersion").is_some_and(Value::is_string), "{origin}: no apiVersion");
                let is_kustomization = object["kind"] == "Kustomization";
                assert!(
                    is_kustomization || doc.value["metadata"]["name"].is_string(),
                    "{origin}: {} without metadata.name",
                    object["kind"]
                );
            }
            Value::Array(ops) => {
                for op in ops {
                    assert!(
                        op["op"].is_string() && op["path"].is_string(),
                        "{origin}: not a JSON patch operation: {op}"
                    );
                }
            }
            other => panic!("{origin}: neither a Kubernetes object nor a JSON patch: {other}"),
        }
    }
}

#[test]
fn kustomizations_name_only_files_that_exist() {
    for dir in [base_dir(), overlay_dir(), workload_identity_dir()] {
        let kustomization = &parse_yaml(&read(&dir.join("kustomization.yaml")), "kustomization.yaml")[0];
        let mut files: Vec<String> = Vec::new();
        for key in ["resources"] {
            if let Some(list) = kustomization[key].as_array() {
                files.extend(list.iter().map(|v| str_of(v, key).to_owned()));
            }
        }
        if let Some(patches) = kustomization["patches"].as_array() {
            files.extend(patches.iter().filter_map(|p| p["path"].as_str()).map(str::to_owned));
        }
        if let Some(generators) = kustomization["configMapGenerator"].as_array() {
            for generator in generators {
                files.extend(array(&generator["files"], "files").iter().map(|f| str_of(f, "file").to_owned()));
            }
        }
        assert!(!files.is_empty(), "{}: names no files", dir.display());
        for file in files {
            assert!(dir.join(&file).exists(), "{}: names {file}, which does not exist", dir.display());
        }
    }
}

#[test]
fn the_config_map_config_passes_tokenproxy_check() {
    let base = Base::load();
    // The library accepted it (Base::load); the binary must too, exactly as an operator would run it.
    let dir = tempfile::tempdir().expect("temp dir");
    let rewritten = with_stand_in_secrets(&base.toml, dir.path());
    let path = dir.path().join("tokenproxy.toml");
    std::fs::write(&path, toml::to_string(&rewritten).expect("TOML")).expect("write the config");
    let output = tokenproxy_command(&["check", "--config"]).arg(&path).output().expect("run tokenproxy check");
    assert!(
        output.status.success(),
        "tokenproxy check failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // The only thing rewritten was the secret path: the file as shipped names the path the Secret is mounted at.
    assert!(base.toml_text.contains("client_secret_file = \"/var/run/secrets/tokenproxy/client-secret\""));
}

#[test]
fn the_config_is_mounted_where_the_container_reads_it() {
    let base = Base::load();
    let sidecar = base.sidecar();
    let args: Vec<&str> = array(&sidecar["args"], "tokenproxy args").iter().map(|a| str_of(a, "arg")).collect();
    let config_path = args
        .windows(2)
        .find(|pair| pair[0] == "--config")
        .map(|pair| pair[1])
        .unwrap_or_else(|| panic!("the tokenproxy container runs without --config: {args:?}"));
    assert_eq!(args.first(), Some(&"run"), "the container runs `tokenproxy run`");
    let (mount, volume) = base.mount_of(config_path);
    assert!(mount.get("subPath").is_none(), "the config is mounted as a directory, not with subPath");
    assert_eq!(volume["configMap"]["name"], "tokenproxy-config", "the config volume is the generated ConfigMap");
    let file = config_path.rsplit('/').next().expect("a file name");
    assert_eq!(file, config_map_generator_file(&base.kustomization), "the ConfigMap key is the file tokenproxy reads");
}

#[test]
fn probes_use_the_admin_listener_and_its_endpoints() {
    let base = Base::load();
    let sidecar = base.sidecar();
    assert!(
        !base.config.admin.listen.ip().is_loopback(),
        "admin.listen ({}) must not be loopback: the kubelet probes the pod IP",
        base.config.admin.listen
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &sidecar[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(resolve_port(sidecar, &get["port"]), base.admin_port(), "{probe} port is admin.listen's port");
    }
}

#[test]
fn the_proxy_listens_on_loopback_where_the_app_calls_it() {
    let base = Base::load();
    let listen = base.config.server.listen;
    assert!(listen.ip().is_loopback(), "server.listen ({listen}) stays inside the pod");
    let app = array(&base.pod_spec()["containers"], "containers")
        .iter()
        .find(|c| c["name"] != SIDECAR)
        .expect("the pod has an app container beside tokenproxy");
    let url = str_of(&named(&app["env"], "API_BASE_URL", "app env")["value"], "API_BASE_URL");
    assert_eq!(url, format!("http://{listen}"), "the app calls the proxy listener");
    let declared: Vec<u16> = array(&base.sidecar()["ports"], "ports")
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    assert!(!declared.contains(&listen.port()), "the loopback proxy port is not declared as a container port");
}

#[test]
fn termination_grace_period_exceeds_shutdown_grace() {
    let base = Base::load();
    let grace =
        base.pod_spec()["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds is set");
    let shutdown_grace = seconds(base.config.server.shutdown_grace);
    assert!(
        grace > shutdown_grace,
        "terminationGracePeriodSeconds ({grace}) must exceed server.shutdown_grace ({shutdown_grace}s)"
    );
}

#[test]
fn the_secret_is_mounted_where_client_secret_file_points() {
    let base = Base::load();
    let providers = base.toml["providers"].as_table().expect("[providers]");
    let mut checked = 0;
    for (name, provider) in providers {
        let Some(path) = provider.get("client_secret_file").and_then(|v| v.as_str()) else { continue };
        let (mount, volume) = base.mount_of(path);
        assert!(mount.get("subPath").is_none(), "{name}: a subPath mount never sees a rotated secret");
        let secret_name = str_of(&volume["secret"]["secretName"], "the volume above client_secret_file is a Secret");
        let relative = &path[str_of(&mount["mountPath"], "mountPath").trim_end_matches('/').len() + 1..];
        let key = match volume["secret"]["items"].as_array() {
            Some(items) => str_of(
                &items.iter().find(|item| item["path"] == relative).expect("an item for the file")["key"],
                "item key",
            ),
            None => relative,
        };
        let secret = object(&base.docs, "Secret", secret_name);
        assert!(
            secret["stringData"].get(key).is_some() || secret["data"].get(key).is_some(),
            "Secret {secret_name} has no key {key} (providers.{name}.client_secret_file = {path})"
        );
        checked += 1;
    }
    assert!(checked > 0, "no provider reads its client secret from a file");
}

#[test]
fn the_state_dir_is_a_private_directory_in_the_writable_volume() {
    let base = Base::load();
    // state.dir is a directory tokenproxy creates (mode 0700) in the volume: an emptyDir is mode 0777, which
    // tokenproxy refuses as a state directory (others could plant files where refresh tokens are written).
    let dir = base.config.state.dir.clone();
    let volume_path = dir.parent().expect("state.dir is in a volume").display().to_string();
    let mount = array(&base.sidecar()["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == volume_path.as_str())
        .unwrap_or_else(|| {
            panic!(
                "the parent of state.dir {} is not a volume mount: with a read-only root it could not be written",
                dir.display()
            )
        });
    assert_ne!(mount["readOnly"], true, "the state dir is writable");
    let volume = named(&base.pod_spec()["volumes"], str_of(&mount["name"], "name"), "volumes");
    assert!(volume.get("emptyDir").is_some(), "the state dir is an emptyDir");
}

#[test]
fn containers_run_as_non_root_with_a_read_only_root_filesystem() {
    let base = Base::load();
    let pod = base.pod_spec();
    for container in array(&pod["containers"], "containers") {
        let name = &container["name"];
        let security = &container["securityContext"];
        let non_root = security["runAsNonRoot"] == true
            || (security["runAsNonRoot"].is_null() && pod["securityContext"]["runAsNonRoot"] == true);
        assert!(non_root, "container {name} may run as root");
        assert_eq!(security["readOnlyRootFilesystem"], true, "container {name}: readOnlyRootFilesystem");
        assert_eq!(security["allowPrivilegeEscalation"], false, "container {name}: allowPrivilegeEscalation");
        let dropped = array(&security["capabilities"]["drop"], "capabilities.drop");
        assert!(dropped.iter().any(|c| c == "ALL"), "container {name} keeps capabilities");
        assert!(container["resources"]["limits"]["memory"].is_string(), "container {name} has no memory limit");
        assert!(container["resources"]["requests"]["cpu"].is_string(), "container {name} has no CPU request");
    }
    let user = pod["securityContext"]["runAsUser"].as_u64().expect("the pod sets runAsUser");
    assert_ne!(user, 0, "the pod runs as root");
    assert_eq!(pod["automountServiceAccountToken"], false, "the API token is not mounted");
}

#[test]
fn the_projected_service_account_token_is_mounted() {
    let base = Base::load();
    let (_, volume) = base.mount_of("/var/run/secrets/tokens/sa-token");
    let sources = array(&volume["projected"]["sources"], "projected sources");
    let token = sources
        .iter()
        .map(|s| &s["serviceAccountToken"])
        .find(|t| t.is_object())
        .expect("a serviceAccountToken source");
    assert_eq!(token["path"], "sa-token");
    assert_eq!(token["audience"], "tokenproxy");
}

#[test]
fn the_metrics_service_targets_the_admin_port() {
    let base = Base::load();
    let services: Vec<&Value> = objects(&base.docs, "Service").collect();
    let service = services
        .iter()
        .find(|s| s["spec"]["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "metrics")));
    let service = service.expect("a Service with a port named metrics");
    let port = named(&service["spec"]["ports"], "metrics", "Service ports");
    assert_eq!(resolve_port(base.sidecar(), &port["targetPort"]), base.admin_port());
    let selector = service["spec"]["selector"].as_object().expect("a selector");
    let labels = &base.deployment()["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the Service selects the pod (label {key})");
    }
    for monitor in objects(&base.docs, "ServiceMonitor") {
        let endpoints = array(&monitor["spec"]["endpoints"], "ServiceMonitor endpoints");
        assert!(endpoints.iter().all(|e| e["port"] == "metrics" && e["path"] == "/metrics"));
        let wanted = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
        for (key, value) in wanted {
            assert_eq!(&service["metadata"]["labels"][key], value, "the ServiceMonitor selects the Service");
        }
    }
}

/// Applies an RFC 6902 JSON patch (the operations the overlay uses: test, add, remove, replace, move).
fn apply_json_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    fn split(pointer: &str) -> Result<(String, String), String> {
        let (parent, last) = pointer.rsplit_once('/').ok_or_else(|| format!("bad pointer {pointer}"))?;
        Ok((parent.to_owned(), last.replace("~1", "/").replace("~0", "~")))
    }
    fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
        let (parent, last) = split(pointer)?;
        match doc.pointer_mut(&parent) {
            Some(Value::Object(map)) => {
                map.insert(last, value);
                Ok(())
            }
            Some(Value::Array(items)) if last == "-" => {
                items.push(value);
                Ok(())
            }
            Some(Value::Array(items)) => {
                let index: usize = last.parse().map_err(|_| format!("bad index in {pointer}"))?;
                if index > items.len() {
                    return Err(format!("{pointer}: index out of range"));
                }
                items.insert(index, value);
                Ok(())
            }
            _ => Err(format!("{pointer}: no parent")),
        }
    }
    fn remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
        let (parent, last) = split(pointer)?;
        match doc.pointer_mut(&parent) {
            Some(Value::Object(map)) => map.remove(&last).ok_or_else(|| format!("{pointer}: not found")),
            Some(Value::Array(items)) => {
                let index: usize = last.parse().map_err(|_| format!("bad index in {pointer}"))?;
                (index < items.len()).then(|| items.remove(index)).ok_or_else(|| format!("{pointer}: out of range"))
            }
            _ => Err(format!("{pointer}: no parent")),
        }
    }
    for op in ops {
        let path = str_of(&op["path"], "path");
        match str_of(&op["op"], "op") {
            "test" => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed: {path} is {:?}, not {}", doc.pointer(path), op["value"]));
                }
            }
            "add" => add(doc, path, op["value"].clone())?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                remove(doc, path)?;
                add(doc, path, op["value"].clone())?;
            }
            "move" => {
                let value = remove(doc, str_of(&op["from"], "from"))?;
                add(doc, path, value)?;
            }
            other => return Err(format!("unsupported op {other}")),
        }
    }
    Ok(())
}

/// The checks both ways of rendering the overlay must pass.
fn assert_native_sidecar(pod: &Value, origin: &str) {
    let init = named(&pod["initContainers"], SIDECAR, &format!("{origin}: initContainers"));
    assert_eq!(init["restartPolicy"], "Always", "{origin}: tokenproxy is a native sidecar");
    assert_eq!(
        array(&pod["initContainers"], "initContainers")[0]["name"],
        SIDECAR,
        "{origin}: tokenproxy starts before any other init container"
    );
    assert!(
        array(&pod["containers"], "containers").iter().all(|c| c["name"] != SIDECAR),
        "{origin}: tokenproxy is no longer a regular container"
    );
    assert!(!array(&pod["containers"], "containers").is_empty(), "{origin}: the app is still there");
    assert_eq!(init["startupProbe"]["httpGet"]["path"], "/healthz", "{origin}: the app waits for the listeners");
    assert_eq!(init["readinessProbe"]["httpGet"]["path"], "/readyz", "{origin}: probes came along");
}

#[test]
fn the_native_sidecar_overlay_makes_tokenproxy_a_restartable_init_container() {
    let kustomization = &parse_yaml(&read(&overlay_dir().join("kustomization.yaml")), "overlay kustomization")[0];
    assert!(array(&kustomization["resources"], "resources").iter().any(|r| r == "../base"));
    let patches = array(&kustomization["patches"], "patches");
    let base = Base::load();
    let mut deployment = base.deployment().clone();
    for patch in patches {
        assert_eq!(patch["target"]["kind"], "Deployment");
        assert_eq!(patch["target"]["name"], deployment["metadata"]["name"], "the patch targets the base Deployment");
        let file = str_of(&patch["path"], "patch path");
        let ops = parse_yaml(&read(&overlay_dir().join(file)), file).remove(0);
        let ops = array(&ops, file);
        let sets_always = ops.iter().any(|op| {
            op["op"] == "add"
                && op["path"].as_str().is_some_and(|p| p.starts_with("/spec/template/spec/initContainers/"))
                && op["path"].as_str().is_some_and(|p| p.ends_with("/restartPolicy"))
                && op["value"] == "Always"
        });
        assert!(sets_always, "{file}: no `restartPolicy: Always` for the init container");
        apply_json_patch(&mut deployment, ops).unwrap_or_else(|e| panic!("{file} does not apply to the base: {e}"));
    }
    assert_native_sidecar(&deployment["spec"]["template"]["spec"], "overlay applied by this test");
}

/// Runs `kubectl kustomize DIR`; `None` when kubectl is not installed.
fn kustomize(dir: &Path) -> Option<Vec<Value>> {
    let output = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run kubectl: {e}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    Some(parse_yaml(&String::from_utf8_lossy(&output.stdout), "kubectl kustomize output"))
}

#[test]
fn kubectl_kustomize_renders_both_variants_when_kubectl_is_installed() {
    let Some(base) = kustomize(&base_dir()) else {
        eprintln!("kubectl is not installed: skipping the kustomize rendering (the other tests cover the files)");
        return;
    };
    let overlay = kustomize(&overlay_dir()).expect("kubectl is installed");
    for (docs, origin) in [(&base, "base"), (&overlay, "native-sidecar")] {
        let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").expect("the generated ConfigMap");
        let generated_name = str_of(&config_map["metadata"]["name"], "ConfigMap name");
        assert!(generated_name.starts_with("tokenproxy-config-"), "{origin}: the name carries the content hash");
        let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("the Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(named(&pod["volumes"], "config", "volumes")["configMap"]["name"], generated_name);
        let image = if origin == "base" {
            &named(&pod["containers"], SIDECAR, "containers")["image"]
        } else {
            assert_native_sidecar(pod, "kubectl kustomize");
            &named(&pod["initContainers"], SIDECAR, "initContainers")["image"]
        };
        assert!(str_of(image, "image").contains("tokenproxy:"), "{origin}: the image is set by `images:`");
    }
}

// ------------------------------------------------------------------------------------------------ PromQL

/// Labels any scraped series may carry besides its own: the target labels Prometheus (and the Prometheus Operator,
/// through the ServiceMonitor) add.
const TARGET_LABELS: &[&str] = &["job", "instance", "pod", "namespace"];

const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"];

const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];

/// Words followed by a list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// A PromQL token, as far as the checks here need them.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A name: a metric, a function, an aggregation, a keyword, or a label of a `by (…)` list.
    Word(String),
    /// `{…}`: the label names its matchers use.
    Matchers(Vec<String>),
    Open,
    Close,
    /// Anything else: a string, a number, a duration, a `[…]` range, an operator, a comma.
    Other,
}

/// The label name a matcher starts with (`route=~"$route"` → `route`).
fn matcher_label(matcher: &str) -> Option<String> {
    let name: String = matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

/// The tokens of a PromQL expression; `#` comments are dropped.
fn promql_tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    // The index just past the string that opens at `i`.
    let string_end = |i: usize| {
        let quote = chars[i];
        let mut j = i + 1;
        while j < chars.len() && chars[j] != quote {
            j += if chars[j] == '\\' && quote != '`' { 2 } else { 1 };
        }
        j + 1
    };
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i = string_end(i);
                tokens.push(Token::Other);
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            ')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
                tokens.push(Token::Other);
            }
            '{' => {
                let mut labels = Vec::new();
                let mut matcher = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '}' {
                    match chars[i] {
                        '"' | '\'' | '`' => {
                            i = string_end(i);
                            matcher.push('"');
                            continue;
                        }
                        ',' => labels.extend(matcher_label(&std::mem::take(&mut matcher))),
                        other => matcher.push(other),
                    }
                    i += 1;
                }
                labels.extend(matcher_label(&matcher));
                i += 1;
                tokens.push(Token::Matchers(labels));
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_')) {
                    i += 1;
                }
                tokens.push(Token::Other);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':')) {
                    i += 1;
                }
                tokens.push(Token::Word(chars[start..i].iter().collect()));
            }
            c => {
                if !c.is_whitespace() {
                    tokens.push(Token::Other);
                }
                i += 1;
            }
        }
    }
    tokens
}

/// The index of the `)` that closes the `(` at `open`.
fn closing(tokens: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        match token {
            Token::Open => depth += 1,
            Token::Close => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The index of the `(` that the `)` at `close` closes.
fn opening(tokens: &[Token], close: usize) -> Option<usize> {
    let mut depth = 0usize;
    for i in (0..=close).rev() {
        match tokens[i] {
            Token::Close => depth += 1,
            Token::Open => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The word at `i` when it starts a label list: `by (`, `on (`, ….
fn label_list_at(tokens: &[Token], i: usize) -> Option<String> {
    let Token::Word(word) = &tokens[i] else { return None };
    let word = word.to_ascii_lowercase();
    (LABEL_LISTS.contains(&word.as_str()) && tokens.get(i + 1) == Some(&Token::Open)).then_some(word)
}

/// The metric name at `i`: a word that is no keyword, aggregation or label-list word, and not a function (a word
/// before `(`).
fn metric_at(tokens: &[Token], i: usize) -> Option<&str> {
    let Token::Word(word) = &tokens[i] else { return None };
    let lower = word.to_ascii_lowercase();
    let special = [KEYWORDS, AGGREGATIONS, LABEL_LISTS].iter().any(|words| words.contains(&lower.as_str()));
    (!special && tokens.get(i + 1) != Some(&Token::Open)).then_some(word.as_str())
}

/// The metric names among `tokens`, label lists skipped.
fn metrics_in(tokens: &[Token]) -> BTreeSet<String> {
    let mut metrics = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        if label_list_at(tokens, i).is_some() {
            i = closing(tokens, i + 1).map_or(tokens.len(), |close| close + 1);
            continue;
        }
        metrics.extend(metric_at(tokens, i).map(str::to_owned));
        i += 1;
    }
    metrics
}

/// What a PromQL expression asks of the metrics it reads.
#[derive(Debug, Default, PartialEq)]
struct PromqlUses {
    /// The metric names it selects (series names: `x_bucket` of a histogram `x`).
    metrics: BTreeSet<String>,
    /// `(metric, label)` for each label a selector's `{…}` matches on; the metric is empty for a selector without
    /// a metric name.
    matched: BTreeSet<(String, String)>,
    /// `(label, metrics)` for each label of a `by`/`without` list, with the metrics of the expression it
    /// aggregates, and of an `on`/`ignoring`/`group_left`/`group_right` list, with every metric of the expression.
    grouped: BTreeSet<(String, BTreeSet<String>)>,
}

/// Reads a PromQL expression: its metric names, and the labels it uses with the metrics they must belong to.
fn promql_uses(expr: &str) -> PromqlUses {
    let tokens = promql_tokens(expr);
    let unbalanced = || panic!("unbalanced parentheses in `{expr}`");
    let mut uses = PromqlUses { metrics: metrics_in(&tokens), ..PromqlUses::default() };
    let mut i = 0;
    while i < tokens.len() {
        if let Some(word) = label_list_at(&tokens, i) {
            let close = closing(&tokens, i + 1).unwrap_or_else(unbalanced);
            let scope = if word == "by" || word == "without" {
                let argument = if tokens.get(close + 1) == Some(&Token::Open) {
                    // `sum by (…) (argument)`
                    &tokens[close + 1..=closing(&tokens, close + 1).unwrap_or_else(unbalanced)]
                } else if i > 0 && tokens[i - 1] == Token::Close {
                    // `sum (argument) by (…)`
                    &tokens[opening(&tokens, i - 1).unwrap_or_else(unbalanced)..i]
                } else {
                    panic!("`{word} (…)` aggregates nothing in `{expr}`")
                };
                metrics_in(argument)
            } else {
                uses.metrics.clone()
            };
            for token in &tokens[i + 2..close] {
                if let Token::Word(label) = token {
                    uses.grouped.insert((label.clone(), scope.clone()));
                }
            }
            i = close + 1;
            continue;
        }
        if let Token::Matchers(labels) = &tokens[i] {
            let metric = if i > 0 { metric_at(&tokens, i - 1).unwrap_or_default() } else { "" };
            for label in labels {
                uses.matched.insert((metric.to_owned(), label.clone()));
            }
        }
        i += 1;
    }
    uses
}

/// Whether the series `series` can carry `label`: a label of its family, a target label, or `le` of a histogram's
/// `_bucket` series (`quantile` of a summary's, though tokenproxy has none).
fn has_label(registered: &BTreeMap<String, Registered>, series: &str, label: &str) -> bool {
    let Some((name, metric)) = family(registered, series) else { return false };
    metric.labels.contains(label)
        || TARGET_LABELS.contains(&label)
        || (label == "le" && metric.kind == "histogram" && series == format!("{name}_bucket"))
        || (label == "quantile" && metric.kind == "summary")
}

/// Checks a PromQL expression against the registry: it reads at least one metric; each is a metric tokenproxy
/// registers (`_bucket`, `_sum` and `_count` only of a histogram); each label it matches on or lists in
/// `by`/`without`/`on`/`ignoring`/`group_*` is one the metrics it applies to have (see [`has_label`]).
fn assert_uses_registered_metrics(expr: &str, origin: &str, registered: &BTreeMap<String, Registered>) {
    let uses = promql_uses(expr);
    assert!(!uses.metrics.is_empty(), "{origin}: the expression reads no metric: {expr}");
    for metric in &uses.metrics {
        assert!(
            family(registered, metric).is_some(),
            "{origin}: `{metric}` is not a metric tokenproxy registers (docs/metrics-and-alerts.md): {expr}"
        );
    }
    for (metric, label) in &uses.matched {
        assert!(!metric.is_empty(), "{origin}: a selector without a metric name matches on `{label}`: {expr}");
        assert!(has_label(registered, metric, label), "{origin}: `{metric}` has no label `{label}`: {expr}");
    }
    for (label, metrics) in &uses.grouped {
        for metric in metrics {
            assert!(
                has_label(registered, metric, label),
                "{origin}: `{label}` is in a label list, but `{metric}` has no such label: {expr}"
            );
        }
    }
}

#[test]
fn the_promql_scanner_finds_metrics_and_the_labels_used_with_them() {
    let uses = promql_uses(
        r#"sum without (outcome) (increase(foo_total{outcome="error", x=~"a}b,c"}[15m])) > 1e3 and on (pod) bar offset 5m
           unless max by (provider) (baz) - time() < 60
           # qux{ignored="comment"}
           + histogram_quantile(0.9, sum(rate(h_bucket[$__rate_interval])) by (le, route)) + {job="j"}"#,
    );
    let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<String>>();
    assert_eq!(uses.metrics, strings(&["bar", "baz", "foo_total", "h_bucket"]));
    let matched: Vec<(&str, &str)> = uses.matched.iter().map(|(m, l)| (m.as_str(), l.as_str())).collect();
    assert_eq!(matched, [("", "job"), ("foo_total", "outcome"), ("foo_total", "x")]);
    let grouped: Vec<(&str, BTreeSet<String>)> = uses.grouped.iter().map(|(l, m)| (l.as_str(), m.clone())).collect();
    assert_eq!(
        grouped,
        [
            ("le", strings(&["h_bucket"])),
            ("outcome", strings(&["foo_total"])),
            ("pod", uses.metrics.clone()),
            ("provider", strings(&["baz"])),
            ("route", strings(&["h_bucket"])),
        ]
    );
}

#[test]
fn the_promql_check_refuses_unknown_metrics_and_labels() {
    let registered = registered_metrics();
    let check =
        |expr: &str| std::panic::catch_unwind(|| assert_uses_registered_metrics(expr, "test", &registered)).is_ok();
    assert!(check(r#"sum by (route, le) (rate(tokenproxy_request_duration_seconds_bucket{job="j"}[5m]))"#));
    assert!(check("tokenproxy_token_expires_at_seconds - time()"));
    assert!(!check("time()"), "no metric");
    assert!(!check("rate(tokenproxy_no_such_total[5m])"), "unknown metric");
    assert!(!check("rate(tokenproxy_requests_total_count[5m])"), "`_count` of a counter");
    assert!(!check(r#"tokenproxy_requests_total{provider="p"}"#), "a label of another metric");
    assert!(!check("sum by (provider) (tokenproxy_requests_total)"), "grouped by another metric's label");
    assert!(!check("sum (tokenproxy_requests_total) without (outcome)"), "suffix form");
    assert!(!check("sum by (le) (rate(tokenproxy_request_duration_seconds_count[5m]))"), "`le` of no bucket");
    assert!(!check(r#"{job="j"}"#), "a selector without a metric name");
}

#[test]
fn alerts_use_only_tokenproxy_metrics_and_have_runbooks() {
    let base = Base::load();
    let registered = registered_metrics();
    let troubleshooting = read(&repo().join("docs/troubleshooting.md"));
    let anchors = markdown::anchors(&troubleshooting);
    let mut alerts = BTreeSet::new();
    for rule_set in objects(&base.docs, "PrometheusRule") {
        assert_eq!(rule_set["apiVersion"], "monitoring.coreos.com/v1");
        for group in array(&rule_set["spec"]["groups"], "groups") {
            for rule in array(&group["rules"], "rules") {
                let name = str_of(&rule["alert"], "alert name");
                let expr = str_of(&rule["expr"], "expr");
                assert_uses_registered_metrics(expr, name, &registered);
                assert!(
                    matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical" | "info")),
                    "{name}: severity label"
                );
                for annotation in ["summary", "description"] {
                    assert!(
                        rule["annotations"][annotation].as_str().is_some_and(|s| !s.trim().is_empty()),
                        "{name}: no {annotation}"
                    );
                }
                let runbook = str_of(&rule["annotations"]["runbook_url"], "runbook_url");
                let (page, anchor) = runbook.split_once('#').unwrap_or((runbook, ""));
                assert!(page.ends_with("docs/troubleshooting.md"), "{name}: runbook_url points at {page}");
                assert!(anchors.contains(anchor), "{name}: docs/troubleshooting.md has no heading #{anchor}");
                assert!(alerts.insert(name.to_owned()), "alert {name} is defined twice");
            }
        }
    }
    for required in REQUIRED_ALERTS {
        assert!(alerts.contains(*required), "alert {required} is missing");
    }
}

// ------------------------------------------------------------------------------------------------ Grafana

/// The Grafana dashboard, `deploy/grafana/tokenproxy.json`.
fn dashboard() -> Value {
    let path = repo().join("deploy/grafana/tokenproxy.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", path.display()))
}

/// The dashboard's panels, those of collapsed rows included.
fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut panels = Vec::new();
    for panel in array(&dashboard["panels"], "panels") {
        panels.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
    }
    panels
}

/// How a panel is named in a failure: `panel 3 "Token calls by provider and outcome"`.
fn panel_origin(panel: &Value) -> String {
    format!("panel {} {}", panel["id"], panel["title"])
}

/// The query of a template variable: `query` (a string, or an object with `query`), and `definition`, which
/// Grafana shows, must say the same.
fn variable_query(variable: &Value) -> &str {
    let name = str_of(&variable["name"], "variable name");
    let query = variable["query"]["query"].as_str().or(variable["query"].as_str());
    let query = query.unwrap_or_else(|| panic!("variable {name}: no query"));
    if let Some(definition) = variable["definition"].as_str() {
        assert_eq!(definition, query, "variable {name}: `definition` differs from the query");
    }
    query
}

/// The `$name` and `${name}` (also `${name:format}`) references of a text.
fn variable_references(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices('$') {
        let rest = text[at + 1..].strip_prefix('{').unwrap_or(&text[at + 1..]);
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            names.insert(name);
        }
    }
    names
}

#[test]
fn the_grafana_dashboard_has_unique_panels_on_one_datasource_without_overlap() {
    let dashboard = dashboard();
    assert!(dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty()), "the dashboard has a uid");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion: Grafana 9 or later");
    let variables = array(&dashboard["templating"]["list"], "templating.list");
    let datasource = named(&dashboard["templating"]["list"], "datasource", "templating.list");
    assert_eq!(datasource["type"], "datasource", "`datasource` is a data source variable");
    assert_eq!(datasource["query"], "prometheus", "`datasource` offers Prometheus data sources");
    let expected = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(variable["datasource"], expected, "variable {}: the data source", variable["name"]);
    }

    let panels = dashboard_panels(&dashboard);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for panel in panels {
        let origin = panel_origin(panel);
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("{origin}: no numeric id"));
        assert!(ids.insert(id), "{origin}: the id {id} is used twice");
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()), "{origin}: no title");
        assert_eq!(panel["datasource"], expected, "{origin}: the panel's data source is not ${{datasource}}");
        let targets = array(&panel["targets"], &format!("{origin}: targets"));
        assert!(!targets.is_empty(), "{origin}: no query");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            if !target["datasource"].is_null() {
                assert_eq!(target["datasource"], expected, "{origin}: a query's data source is not ${{datasource}}");
            }
            assert!(ref_ids.insert(str_of(&target["refId"], "refId")), "{origin}: a refId is used twice");
        }
        let grid = &panel["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"]
            .map(|key| grid[key].as_u64().unwrap_or_else(|| panic!("{origin}: gridPos.{key} is not a number")));
        assert!(w > 0 && h > 0 && x + w <= 24, "{origin}: gridPos {grid} is empty or wider than the 24 columns");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let apart = x + w <= *ox || *ox + ow <= x || y + h <= *oy || *oy + oh <= y;
            assert!(apart, "{origin} overlaps {other}");
        }
        boxes.push((origin, [x, y, w, h]));
    }
}

#[test]
fn the_grafana_dashboard_queries_only_registered_metrics_and_labels() {
    let dashboard = dashboard();
    let registered = registered_metrics();
    let variables = array(&dashboard["templating"]["list"], "templating.list");
    let defined: BTreeSet<&str> = variables.iter().map(|v| str_of(&v["name"], "variable name")).collect();
    let assert_defined = |text: &str, origin: &str| {
        for name in variable_references(text) {
            let builtin = name.starts_with("__");
            assert!(builtin || defined.contains(name.as_str()), "{origin}: `${name}` is not a variable: {text}");
        }
    };

    let mut checked = 0;
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let origin = format!("variable {}", variable["name"]);
        let query = variable_query(variable);
        assert_defined(query, &origin);
        let args = query.trim().strip_prefix("label_values(").and_then(|rest| rest.strip_suffix(')'));
        let (selector, label) = args
            .and_then(|args| args.rsplit_once(','))
            .map(|(selector, label)| (selector, label.trim()))
            .filter(|(_, label)| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or_else(|| panic!("{origin}: not `label_values(metric, label)`, which this test checks: {query}"));
        assert_uses_registered_metrics(selector, &origin, &registered);
        for metric in promql_uses(selector).metrics {
            assert!(has_label(&registered, &metric, label), "{origin}: `{metric}` has no label `{label}`: {query}");
        }
        checked += 1;
    }
    for panel in dashboard_panels(&dashboard) {
        for target in array(&panel["targets"], "targets") {
            let origin = format!("{}, query {}", panel_origin(panel), target["refId"]);
            let expr = str_of(&target["expr"], &format!("{origin}: expr"));
            assert_defined(expr, &origin);
            assert_uses_registered_metrics(expr, &origin, &registered);
            checked += 1;
        }
    }
    assert!(checked > 15, "only {checked} queries checked");
}

/// The workload-identity overlay: its config passes `check --offline` as shipped (the token exists only in the pod)
/// and plain `check` with a stand-in token; it reads the token where the patched volume puts it, and the patch gives
/// that token Entra's audience and removes the client secret.
#[test]
fn the_workload_identity_overlay_reads_the_projected_token_entra_accepts() {
    let dir = workload_identity_dir();
    let kustomization = &parse_yaml(&read(&dir.join("kustomization.yaml")), "kustomization.yaml")[0];
    let config_file = config_map_generator_file(kustomization);
    let generator = named(&kustomization["configMapGenerator"], "tokenproxy-config", "configMapGenerator");
    assert_eq!(generator["behavior"], "replace", "the overlay's config replaces the base's");
    let text = read(&dir.join(&config_file));
    let toml: toml::Table = toml::from_str(&text).expect("the overlay's config is TOML");
    let provider = toml["providers"]["orders"].as_table().expect("provider orders");
    assert_eq!(provider["client_auth"].as_str(), Some("client_assertion"));
    assert!(!provider.contains_key("client_secret_file"), "no secret in this overlay");
    let token_path = PathBuf::from(provider["client_assertion_file"].as_str().expect("client_assertion_file"));

    // The patch: the projected token gets Entra's audience and the file name the config reads; the secret goes.
    let patch = &parse_yaml(&read(&dir.join("entra-token.yaml")), "entra-token.yaml")[0];
    let ops = patch.as_array().expect("a JSON patch");
    let token = ops
        .iter()
        .find(|op| op["op"] == "replace" && str_of(&op["path"], "path").ends_with("serviceAccountToken"))
        .map(|op| &op["value"])
        .expect("the serviceAccountToken is replaced");
    assert_eq!(token["audience"], "api://AzureADTokenExchange", "the audience Entra accepts");
    let base = Base::load();
    let (mount, volume) = base.mount_of(&token_path.display().to_string());
    assert_eq!(volume["name"], "sa-token", "the token file is in the projected token's volume");
    let mount_path = PathBuf::from(str_of(&mount["mountPath"], "mountPath"));
    assert_eq!(token_path, mount_path.join(str_of(&token["path"], "path")), "the config reads the patched file");
    let removed: Vec<&str> =
        ops.iter().filter(|op| op["op"] == "test").map(|op| str_of(&op["value"], "value")).collect();
    assert!(removed.contains(&"client-secret"), "the client-secret volume and mount are removed: {removed:?}");
    let deletes_secret = array(&kustomization["patches"], "patches")
        .iter()
        .filter_map(|p| p["patch"].as_str())
        .any(|p| p.contains("$patch: delete") && p.contains("tokenproxy-client-secret"));
    assert!(deletes_secret, "the placeholder Secret is deleted");

    // `check --offline` passes as shipped; plain `check` with a stand-in token too.
    let run = |args: &[&str], path: &Path| tokenproxy_command(args).arg(path).output().expect("run tokenproxy check");
    let output = run(&["check", "--offline", "--config"], &dir.join(&config_file));
    assert!(output.status.success(), "check --offline: {}", String::from_utf8_lossy(&output.stderr));
    let temp = tempfile::tempdir().expect("temp dir");
    let stand_in = temp.path().join("azure-identity-token");
    std::fs::write(&stand_in, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln").expect("stand-in token");
    let rewritten = text.replace(&token_path.display().to_string(), &stand_in.display().to_string());
    let path = temp.path().join("tokenproxy.toml");
    std::fs::write(&path, rewritten).expect("write the config");
    let output = run(&["check", "--config"], &path);
    assert!(output.status.success(), "check: {}", String::from_utf8_lossy(&output.stderr));
}
