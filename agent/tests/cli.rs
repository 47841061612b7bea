//! The `poolwarden` binary as an operator uses it: the seed's steps, round trips and refusals.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

const SEED: &str = include_str!("../../examples/calico/seed-pools.yaml");

struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_poolwarden"))
            .args(args)
            .env("POOLWARDEN_DATASTORE", format!("embedded:{}", self.dir.path().join("store.redb").display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(text) = stdin {
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(out.status.success(), "poolwarden {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(!out.status.success(), "poolwarden {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

#[test]
fn seed_steps_from_the_command_line() {
    let cli = Cli::new();
    let pools = cli.file("pools.yaml", SEED);
    let applied = cli.ok(&["apply", "-f", &pools]);
    assert!(applied.starts_with("ippool/external-pool created\nippool/internal-pool created\n"), "{applied}");
    // The seed's `ipipMode: Always` is reported, not silently ignored.
    for pool in ["external-pool", "internal-pool"] {
        assert!(
            applied.contains(&format!("note: pool {pool}: ipipMode Always is not applied: ")),
            "no encapsulation note for {pool}:\n{applied}"
        );
    }
    assert!(
        cli.ok(&["apply", "-f", &pools])
            .starts_with("ippool/external-pool unchanged\nippool/internal-pool unchanged\nnote: ")
    );
    cli.ok(&["annotate", "namespace", "external-ns", "poolwarden.io/ipv4pools=[\"external-pool\"]"]);
    cli.ok(&["annotate", "namespace", "internal-ns", "cni.projectcalico.org/ipv4pools=[\"internal-pool\"]"]);
    let namespaces = cli.ok(&["get", "namespaces"]);
    assert!(namespaces.contains("external-ns   external-pool"), "{namespaces}");

    for ns in ["external-ns", "internal-ns"] {
        for i in 1..=3 {
            let out =
                cli.ok(&["ipam", "assign", "--namespace", ns, "--pod", &format!("nginx-{i}"), "--node", "node-0"]);
            let (ip, pool) = {
                let f: Vec<&str> = out.split_whitespace().collect();
                (f[0].to_string(), f[1].to_string())
            };
            let want_prefix = if ns == "external-ns" { "172.16.0." } else { "192.168.0." };
            assert!(ip.starts_with(want_prefix), "{ns}/nginx-{i} got {ip}");
            assert_eq!(pool, ns.replace("-ns", "-pool"));
        }
    }
    let show = cli.ok(&["ipam", "show"]);
    assert!(show.contains("external-pool   172.16.0.0/26    /29          1/8      3      61"), "{show}");
    let blocks = cli.ok(&["ipam", "show", "--blocks"]);
    assert!(blocks.contains("172.16.0.0/29    external-pool   node-0   3/8"), "{blocks}");
    assert!(cli.ok(&["ipam", "check"]).starts_with("ipam check: clean"));

    let refused = cli.fails(&["delete", "pool", "external-pool"]);
    assert!(refused.contains("still has 3 allocated address(es) in 1 block(s)"), "{refused}");
    assert_eq!(
        cli.ok(&["ipam", "release", "--handle", "external-ns.nginx-2"]),
        "released 172.16.0.1 (handle external-ns.nginx-2)\n"
    );
    assert_eq!(
        cli.ok(&["ipam", "release", "--ip", "172.16.0.0"]),
        "released 172.16.0.0 (handle external-ns.nginx-1)\n"
    );
    assert_eq!(cli.ok(&["ipam", "release", "--ip", "172.16.0.0"]), "172.16.0.0 was not allocated\n");
    let forced = cli.ok(&["delete", "pool", "external-pool", "--force"]);
    assert!(forced.contains("left behind: 1 allocated address(es) in 1 block(s) (172.16.0.0/29)"), "{forced}");
    let check = cli.run(&["ipam", "check"], None);
    assert!(!check.status.success(), "a block without its pool is a problem ipam check must report");
    assert!(String::from_utf8_lossy(&check.stdout).contains("block-outside-pools: block 172.16.0.0/29"));
}

#[test]
fn yaml_output_applies_back_unchanged_from_stdin_and_directories() {
    let cli = Cli::new();
    let dir = cli.file("conf/a.yaml", SEED);
    cli.file(
        "conf/b.yml",
        "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {strictAffinity: true}\n",
    );
    cli.file("conf/ignored.txt", "not yaml");
    let dir = std::path::Path::new(&dir).parent().unwrap().display().to_string();
    assert!(
        cli.ok(&["apply", "-f", &dir])
            .starts_with("ippool/external-pool created\nippool/internal-pool created\nipamconfig/default created\n")
    );
    let yaml = cli.ok(&["get", "pools", "-o", "yaml"]);
    let out = cli.run(&["apply", "-f", "-"], Some(&yaml));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("ippool/external-pool unchanged\nippool/internal-pool unchanged\n")
    );
    let json = cli.ok(&["get", "pools", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["items"][0]["spec"]["blockSize"], 29);
    assert!(cli.ok(&["get", "ipamconfig"]).contains("true"));

    let more = cli.file(
        "more.yaml",
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: third}\nspec: {cidr: 10.0.0.0/16}\n",
    );
    let bad = cli.file(
        "bad.yaml",
        "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: fourth}\nspec: {cidr: 10.0.0.0/8}\n",
    );
    let err = cli.fails(&["apply", "-f", &more, "-f", &bad]);
    assert!(
        err.contains(
            "bad.yaml: document 1 (line 1): IPPool \"fourth\": field spec.cidr: 10.0.0.0/8 overlaps pool \"third\""
        ),
        "{err}"
    );
    assert!(
        cli.fails(&["get", "pools", "third"]).contains("IPPool \"third\" does not exist"),
        "all or nothing: nothing applied"
    );
    assert!(cli.ok(&["apply", "-f", &more, "-f", &pools_in(&cli)]).contains("ippool/third created"));
}

fn pools_in(cli: &Cli) -> String {
    cli.file("again.yaml", SEED)
}

#[test]
fn refusals_name_what_the_user_typed() {
    let cli = Cli::new();
    let err = cli.fails(&["annotate", "namespace", "team", "poolwarden.io/ipv4pools=external-pool"]);
    assert!(
        err.contains("annotation poolwarden.io/ipv4pools on namespace \"team\": \"external-pool\" is not a JSON list"),
        "{err}"
    );
    let err = cli.fails(&["--datastore", "zookeeper:x", "get", "pools"]);
    assert!(err.contains("invalid datastore \"zookeeper:x\""), "{err}");
    let err = cli.fails(&["ipam", "assign", "--namespace", "x", "--node", "n"]);
    assert!(err.contains("no pool admits namespace \"x\" on node \"n\": no IPPool exists"), "{err}");
}

/// A command that only reads never creates a datastore: it says there is none and where it looked; one that
/// writes creates it.
#[test]
fn read_only_commands_never_create_a_datastore() {
    let cli = Cli::new();
    let store = cli.dir.path().join("store.redb");
    for args in [
        &["get", "pools"][..],
        &["get", "blocks", "-o", "json"],
        &["ipam", "show"],
        &["ipam", "check"],
        &["firewall", "export"],
    ] {
        let out = cli.run(args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on no datastore: {}", String::from_utf8_lossy(&out.stdout));
        assert!(
            stderr.contains("there is no datastore at") && stderr.contains(&store.display().to_string()),
            "{args:?}: {stderr}"
        );
        assert!(!store.exists(), "{args:?} created {}", store.display());
    }
    let out = cli.run(&["apply", "-f", "-"], Some(SEED));
    assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
    assert!(store.exists(), "apply creates the datastore");
    assert!(cli.ok(&["get", "pools"]).contains("external-pool"));
}
