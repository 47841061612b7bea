//! `deploy/`: every manifest passes `kubernetes-validate --strict` for Kubernetes 1.30 and 1.37 (offline, the
//! schemas ship with it), the init step installs the plugin and the ConfigMap's conflist, and uninstalling
//! removes everything poolwarden put on a node.

use std::{path::PathBuf, process::Command};

use poolwarden_tests::{Node, binary, plugin_binary, privileged};

const VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // kustomize's own file, not a Kubernetes object (see the test below).
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    found.sort();
    found
}

/// `kubernetes-validate --strict` for one version: (passed, what it printed).
fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate (cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// How many Kubernetes objects the files hold (YAML documents with a `kind`).
fn objects(files: &[PathBuf]) -> usize {
    files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).expect("manifest");
            text.split("\n---")
                .filter(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).is_ok_and(|v| v.get("kind").is_some()))
                .count()
        })
        .sum()
}

#[test]
fn every_manifest_is_valid_for_kubernetes_1_30_and_1_37() {
    let files = manifests();
    for expected in ["configmap.yaml", "crds.yaml", "daemonset.yaml", "rbac.yaml", "uninstall.yaml"] {
        assert!(files.iter().any(|f| f.ends_with(expected)), "deploy/{expected} is missing");
    }
    for version in VERSIONS {
        let (ok, text) = validate(version, &files);
        assert!(ok, "kubernetes-validate {version}:\n{text}");
        // One line per resource: nothing was skipped.
        assert_eq!(text.matches(" passed for resource ").count(), objects(&files), "{text}");
    }
    // Strict means strict: a misspelt field is refused, so the check above can fail.
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("daemonset.yaml");
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("daemonset.yaml");
    std::fs::write(&broken, text.replacen("hostNetwork: true", "hostNetwork: true\n      hostNetwrok: true", 1))
        .expect("write");
    let (ok, text) = validate("1.37.0", &[broken]);
    assert!(!ok, "a misspelt field passed strict validation:\n{text}");
}

#[test]
fn the_daemonset_has_what_a_node_agent_needs() {
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("daemonset.yaml");
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"), "tolerates every taint");
    let agent = &pod["containers"][0];
    assert_eq!(agent["securityContext"]["privileged"].as_bool(), Some(true));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert!(agent[probe]["httpGet"]["path"].is_string(), "{probe}");
    }
    assert!(agent["resources"]["requests"]["memory"].is_string());
    let mounts: Vec<(&str, Option<&str>)> = agent["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap_or_default(), m["mountPropagation"].as_str()))
        .collect();
    for path in
        ["/run/poolwarden", "/sys/fs/bpf", "/var/lib/poolwarden", "/var/run/netns", "/opt/cni/bin", "/etc/cni/net.d"]
    {
        assert!(mounts.iter().any(|(p, _)| *p == path), "{path} is not mounted: {mounts:?}");
    }
    assert!(mounts.contains(&("/var/run/netns", Some("Bidirectional"))), "{mounts:?}");
    // The agent's probes are served where the manifest says (see daemon::server): same port as --metrics-addr.
    let command: Vec<&str> = agent["command"].as_sequence().unwrap().iter().filter_map(|c| c.as_str()).collect();
    assert!(command.contains(&"--metrics-addr=0.0.0.0:9641"), "{command:?}");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"].as_u64(), Some(9641));
}

#[test]
fn the_init_step_installs_the_configmap_conflist_and_the_plugin() {
    let text = std::fs::read_to_string(deploy_dir().join("configmap.yaml")).expect("configmap.yaml");
    let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let conflist = config["data"]["10-poolwarden.conflist"].as_str().expect("the conflist key").to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("10-poolwarden.conflist");
    std::fs::write(&source, &conflist).expect("write");
    let (bin, conf) = (dir.path().join("opt-cni-bin"), dir.path().join("etc-cni-net.d"));
    let plugin = plugin_binary();
    let out = Command::new(binary("poolwarden"))
        .args(["install-cni", "--plugin", &plugin.display().to_string()])
        .args(["--cni-bin-dir", &bin.display().to_string(), "--conflist", &source.display().to_string()])
        .args(["--cni-conf-dir", &conf.display().to_string()])
        .output()
        .expect("run install-cni");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(bin.join("poolwarden-cni")).unwrap(), std::fs::read(&plugin).unwrap());
    let installed = std::fs::read_to_string(conf.join("10-poolwarden.conflist")).expect("installed conflist");
    let value: serde_json::Value = serde_json::from_str(&installed).expect("the conflist is JSON");
    assert_eq!(value["plugins"][0]["type"], "poolwarden-cni");
    // The installed plugin answers VERSION for both spec versions.
    let version = Command::new(bin.join("poolwarden-cni")).env("CNI_COMMAND", "VERSION").output().expect("VERSION");
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).expect("VERSION answers JSON");
    assert!(version["supportedVersions"].as_array().unwrap().iter().any(|v| v == "1.1.0"), "{version}");
}

#[test]
fn uninstall_removes_routes_pins_nat_and_the_conflist() {
    if !privileged() {
        return;
    }
    let mut node = Node::new("10.97.0.9");
    node.apply(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: nat-pool}\n\
         spec: {cidr: 10.36.0.0/24, blockSize: 29, natOutgoing: true}\n",
    );
    node.start_agent();
    let (pod, _) = node.add_pod("u-1", "default", "u-1");
    assert!(node.ns.exec(&["ip", "route", "show", "proto", "97"]).contains("blackhole 10.36.0.0/29"));
    assert!(node.ns.try_exec(&["nft", "list", "table", "inet", "poolwarden_nat"]));
    assert!(std::path::Path::new(&node.bpf_dir()).exists());
    node.stop_agent();
    drop(pod);

    let (bin, conf) = (node.dir.path().join("bin"), node.dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(conf.join("10-poolwarden.conflist"), "{}").unwrap();
    std::fs::write(conf.join("99-other.conflist"), "{}").unwrap();
    std::fs::write(bin.join("poolwarden-cni"), "plugin").unwrap();
    std::fs::write(bin.join("portmap"), "someone else's").unwrap();
    // Someone else's route stays.
    node.ns.exec(&["ip", "route", "add", "blackhole", "192.0.2.0/24"]);
    let out = node.cli_ok(&[
        "uninstall",
        "--cni-bin-dir",
        &bin.display().to_string(),
        "--cni-conf-dir",
        &conf.display().to_string(),
        "--bpf-dir",
        &node.bpf_dir(),
    ]);
    assert!(out.contains("route(s) with protocol 97"), "{out}");
    assert_eq!(node.ns.exec(&["ip", "route", "show", "proto", "97"]).trim(), "", "our routes are gone");
    assert!(node.ns.exec(&["ip", "route", "show"]).contains("blackhole 192.0.2.0/24"), "other routes stay");
    assert!(!node.ns.try_exec(&["nft", "list", "table", "inet", "poolwarden_nat"]), "the NAT table is gone");
    assert!(!std::path::Path::new(&node.bpf_dir()).exists(), "the pins are gone");
    assert!(!conf.join("10-poolwarden.conflist").exists() && conf.join("99-other.conflist").exists());
    assert!(!bin.join("poolwarden-cni").exists() && bin.join("portmap").exists());
}

/// `kubectl apply -k deploy/` installs the custom resources and the agent and nothing else: the uninstall
/// DaemonSet is not in it.
#[test]
fn the_kustomization_installs_the_agent_and_not_the_uninstaller() {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).expect("kustomization.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let resources: Vec<&str> =
        doc["resources"].as_sequence().expect("resources").iter().filter_map(|r| r.as_str()).collect();
    assert_eq!(resources, ["crds.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml"]);
}
