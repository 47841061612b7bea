//! A table of bad inputs, each with the exact error the user sees and proof that the store did not change.

mod support;

use support::Env;

const EXISTING: &str = "\
apiVersion: poolwarden.io/v1
kind: IPPool
metadata: {name: existing}
spec: {cidr: 10.0.0.0/24, blockSize: 28}
";

fn pool(spec: &str) -> String {
    format!("apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n{spec}")
}

/// (what, document text, the exact error).
fn cases() -> Vec<(&'static str, String, &'static str)> {
    vec![
        (
            "malformed YAML",
            "apiVersion: poolwarden.io/v1\nkind: [IPPool\n".into(),
            "pools.yaml: document 1 (line 1): not valid YAML: did not find expected ',' or ']' (line 3)",
        ),
        (
            "tab indentation",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata:\n\tname: p\n".into(),
            "pools.yaml: document 1 (line 1): not valid YAML: found character that cannot start any token (line 4)",
        ),
        (
            "not a mapping",
            "- just\n- a list\n".into(),
            "pools.yaml: document 1 (line 1): expected a document with apiVersion and kind, found [\"just\",\"a list\"]",
        ),
        (
            "missing apiVersion",
            "kind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.9.0.0/24}\n".into(),
            "pools.yaml: document 1 (line 1): missing field apiVersion",
        ),
        (
            "missing kind",
            "apiVersion: poolwarden.io/v1\nmetadata: {name: p}\n".into(),
            "pools.yaml: document 1 (line 1): missing field kind",
        ),
        (
            "unknown kind",
            "apiVersion: poolwarden.io/v1\nkind: IPPoool\nmetadata: {name: p}\n".into(),
            "pools.yaml: document 1 (line 1): unknown kind \"IPPoool\" (apiVersion \"poolwarden.io/v1\"): poolwarden accepts IPPool, IPAMConfig and Namespace",
        ),
        (
            "wrong apiVersion for IPPool",
            "apiVersion: crd.projectcalico.org/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.9.0.0/24}\n".into(),
            "pools.yaml: document 1 (line 1): apiVersion \"crd.projectcalico.org/v1\" is not supported for IPPool: use poolwarden.io/v1 or projectcalico.org/v3",
        ),
        (
            "Namespace with a pool apiVersion",
            "apiVersion: poolwarden.io/v1\nkind: Namespace\nmetadata: {name: ns}\n".into(),
            "pools.yaml: document 1 (line 1): apiVersion \"poolwarden.io/v1\" is not supported for Namespace: use v1",
        ),
        (
            "missing name",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {}\nspec: {cidr: 10.9.0.0/24}\n".into(),
            "pools.yaml: document 1 (line 1): IPPool (unnamed): field metadata.name: missing (required): every object needs a name",
        ),
        (
            "uppercase name",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: Pool_A}\nspec: {cidr: 10.9.0.0/24}\n".into(),
            "pools.yaml: document 1 (line 1): IPPool \"Pool_A\": field metadata.name: \"Pool_A\" is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
        ),
        (
            "missing spec",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p}\n".into(),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec: missing (required)",
        ),
        (
            "missing cidr",
            pool("  blockSize: 29\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: missing (required)",
        ),
        (
            "unparsable cidr",
            pool("  cidr: 10.9.0.300/24\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: \"10.9.0.300/24\" is not a CIDR: expected an address and a prefix length, such as 10.0.0.0/16 or fd00::/48",
        ),
        (
            "cidr without prefix",
            pool("  cidr: 10.9.0.0\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: \"10.9.0.0\" is not a CIDR: expected an address and a prefix length, such as 10.0.0.0/16 or fd00::/48",
        ),
        (
            "host bits set",
            pool("  cidr: 10.9.0.5/24\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: 10.9.0.5/24 has host bits set: the pool's network is 10.9.0.0/24",
        ),
        (
            "unknown spec field",
            pool("  cidr: 10.9.0.0/24\n  blockSzie: 29\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSzie: unknown field `blockSzie`, expected one of `cidr`, `blockSize`, `disabled`, `nodeSelector`, `namespaceSelector`, `allowedNamespaces`, `natOutgoing`, `ipipMode`, `vxlanMode`, `allowedUses`, `disableBGPExport`, `assignmentMode`, `enforcement`",
        ),
        (
            "unknown metadata field",
            "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: p, colour: red}\nspec: {cidr: 10.9.0.0/24}\n".into(),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field metadata.colour: unknown field `colour`, expected one of `name`, `labels`, `annotations`, `namespace`, `uid`, `resourceVersion`, `creationTimestamp`, `generation`, `managedFields`, `finalizers`, `selfLink`",
        ),
        (
            "block size too small v4",
            pool("  cidr: 10.0.0.0/8\n  blockSize: 19\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSize: 19 is out of range: IPv4 block sizes are 20 to 32",
        ),
        (
            "block size too large v4",
            pool("  cidr: 10.9.0.0/24\n  blockSize: 33\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSize: 33 is out of range: IPv4 block sizes are 20 to 32",
        ),
        (
            "block size v4 for a v6 pool",
            pool("  cidr: fd00::/64\n  blockSize: 26\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSize: 26 is out of range: IPv6 block sizes are 116 to 128",
        ),
        (
            "block larger than pool",
            pool("  cidr: 10.9.0.0/29\n  blockSize: 26\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSize: 26 is larger than the pool 10.9.0.0/29: a block cannot be bigger than its pool (use 29 or more)",
        ),
        (
            "block size not a number",
            pool("  cidr: 10.9.0.0/24\n  blockSize: big\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.blockSize: invalid type: string \"big\", expected u8",
        ),
        (
            "bad encapsulation mode",
            pool("  cidr: 10.9.0.0/24\n  ipipMode: Sometimes\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.ipipMode: unknown variant `Sometimes`, expected one of `Never`, `Always`, `CrossSubnet`",
        ),
        (
            "ipip and vxlan together",
            pool("  cidr: 10.9.0.0/24\n  ipipMode: Always\n  vxlanMode: Always\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.vxlanMode: ipipMode and vxlanMode cannot both be enabled on one pool",
        ),
        (
            "ipip on IPv6",
            pool("  cidr: fd00::/64\n  ipipMode: Always\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.ipipMode: Always is not possible for an IPv6 pool: IP-in-IP carries IPv4 only",
        ),
        (
            "unparsable nodeSelector",
            pool("  cidr: 10.9.0.0/24\n  nodeSelector: zone = 'a'\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.nodeSelector: invalid selector \"zone = 'a'\" at character 6: expected `==`, `!=`, `in` or `not in` after label `zone`",
        ),
        (
            "unparsable namespaceSelector",
            pool("  cidr: 10.9.0.0/24\n  namespaceSelector: has(team\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.namespaceSelector: invalid selector \"has(team\" at character 9: expected `)`",
        ),
        (
            "bad allowedNamespaces entry",
            pool("  cidr: 10.9.0.0/24\n  allowedNamespaces: [Team_A]\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.allowedNamespaces: \"Team_A\" is not a valid namespace name",
        ),
        (
            "bad allowedUses",
            pool("  cidr: 10.9.0.0/24\n  allowedUses: [Everything]\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.allowedUses[0]: unknown variant `Everything`, expected one of `Workload`, `Tunnel`, `LoadBalancer`",
        ),
        (
            "natOutgoing not a bool",
            pool("  cidr: 10.9.0.0/24\n  natOutgoing: sometimes\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.natOutgoing: invalid type: string \"sometimes\", expected a boolean",
        ),
        (
            "overlaps a stored pool",
            pool("  cidr: 10.0.0.128/25\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: 10.0.0.128/25 overlaps pool \"existing\" (10.0.0.0/24) (already applied)",
        ),
        (
            "contains a stored pool",
            pool("  cidr: 10.0.0.0/16\n"),
            "pools.yaml: document 1 (line 1): IPPool \"p\": field spec.cidr: 10.0.0.0/16 overlaps pool \"existing\" (10.0.0.0/24) (already applied)",
        ),
        (
            "overlap inside one file",
            format!("{}---\n{}", pool("  cidr: 10.9.0.0/24\n"), pool("  cidr: 10.9.0.0/25\n").replace("name: p", "name: q")),
            "pools.yaml: document 2 (line 8): IPPool \"q\": field spec.cidr: 10.9.0.0/25 overlaps pool \"p\" (10.9.0.0/24) (from pools.yaml: document 1 (line 1))",
        ),
        (
            "same pool twice in one file",
            format!("{}---\n{}", pool("  cidr: 10.9.0.0/24\n"), pool("  cidr: 10.9.0.0/24\n")),
            "pools.yaml: document 2 (line 8): IPPool \"p\" is also given at pools.yaml: document 1 (line 1); give each object once",
        ),
        (
            "changed cidr",
            EXISTING.replace("10.0.0.0/24", "10.0.0.0/23"),
            "pools.yaml: document 1 (line 1): IPPool \"existing\": field spec.cidr: cannot change 10.0.0.0/24 to 10.0.0.0/23: spec.cidr is immutable once a pool exists. To migrate, create a new pool with the new value, set `disabled: true` on \"existing\" so no new addresses come from it, recreate the pods that use it, then delete it",
        ),
        (
            "changed blockSize",
            EXISTING.replace("blockSize: 28", "blockSize: 29"),
            "pools.yaml: document 1 (line 1): IPPool \"existing\": field spec.blockSize: cannot change 28 to 29: spec.blockSize is immutable once a pool exists. To migrate, create a new pool with the new value, set `disabled: true` on \"existing\" so no new addresses come from it, recreate the pods that use it, then delete it",
        ),
        (
            "IPAMConfig not named default",
            "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: mine}\nspec: {}\n".into(),
            "pools.yaml: document 1 (line 1): IPAMConfig \"mine\": field metadata.name: \"mine\": the one IPAMConfig must be named \"default\"",
        ),
        (
            "IPAMConfig negative limit",
            "apiVersion: poolwarden.io/v1\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {maxBlocksPerHost: -1}\n".into(),
            "pools.yaml: document 1 (line 1): IPAMConfig \"default\": field spec.maxBlocksPerHost: invalid value: integer `-1`, expected u32",
        ),
        (
            "namespace annotation not JSON",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    poolwarden.io/ipv4pools: external-pool\n".into(),
            "pools.yaml: document 1 (line 1): Namespace \"ns\": field metadata.annotations[\"poolwarden.io/ipv4pools\"]: \"external-pool\" is not a JSON list of strings, for example '[\"external-pool\"]'",
        ),
        (
            "namespace ipAddrs not addresses",
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    cni.projectcalico.org/ipAddrs: '[\"10.0.0.300\"]'\n".into(),
            "pools.yaml: document 1 (line 1): Namespace \"ns\": field metadata.annotations[\"cni.projectcalico.org/ipAddrs\"]: \"10.0.0.300\" is not an IP address",
        ),
        (
            "List without items",
            "apiVersion: v1\nkind: List\n".into(),
            "pools.yaml: document 1 (line 1): List without an items list",
        ),
        (
            "a good document then a bad one",
            format!("{}---\n{}", pool("  cidr: 10.9.0.0/24\n"), pool("  cidr: 10.8.0.0/24\n  blockSize: 40\n").replace("name: p", "name: q")),
            "pools.yaml: document 2 (line 8): IPPool \"q\": field spec.blockSize: 40 is out of range: IPv4 block sizes are 20 to 32",
        ),
    ]
}

#[tokio::test]
async fn every_bad_input_has_its_exact_error_and_changes_nothing() {
    let env = Env::new();
    env.apply(EXISTING).await;
    let before = env.store.list("").await.unwrap();
    let mut failures = Vec::new();
    for (what, text, expected) in cases() {
        let result = match poolwarden::resources::parse_documents("pools.yaml", &text) {
            Err(e) => Err(e.to_string()),
            Ok(docs) => env.catalog().apply(&docs).await.map_err(|e| e.to_string()),
        };
        let message = match result {
            Ok(applied) => format!("(accepted: {applied:?})"),
            Err(message) => message,
        };
        if message != expected {
            failures.push(format!("{what}:\n  expected {expected}\n  got      {message}"));
        }
        assert_eq!(env.store.list("").await.unwrap(), before, "{what}: the store changed");
    }
    assert!(cases().len() >= 25);
    assert!(failures.is_empty(), "{} case(s) differ:\n{}", failures.len(), failures.join("\n"));
}
