//! The documents users write: `IPPool`, `IPAMConfig` and (standalone) `Namespace`, YAML in and YAML/JSON
//! out, with validation whose messages name the file, the document, the object, the field and the value.
//!
//! `IPPool` is accepted as `poolwarden.io/v1` and, unchanged, as Calico's `projectcalico.org/v3`, so a
//! Calico user's `pools.yaml` applies as it is.

pub mod selector;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_yaml::Value;

pub use selector::{Selector, SelectorError};

/// Our own API group and version.
pub const API_VERSION: &str = "poolwarden.io/v1";
/// Calico's, accepted unchanged for `IPPool` and `IPAMConfiguration`.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";

/// Annotation naming the IPv4 pools a namespace or pod must use (a JSON list of names or CIDRs).
pub const ANNOTATION_IPV4_POOLS: &str = "poolwarden.io/ipv4pools";
/// Annotation naming the IPv6 pools a namespace or pod must use.
pub const ANNOTATION_IPV6_POOLS: &str = "poolwarden.io/ipv6pools";
/// Annotation asking for specific addresses for a pod (a JSON list of addresses).
pub const ANNOTATION_IP_ADDRS: &str = "poolwarden.io/ipAddrs";
/// Calico's spellings of the three annotations, accepted as aliases.
pub const CALICO_ANNOTATION_IPV4_POOLS: &str = "cni.projectcalico.org/ipv4pools";
/// See [`CALICO_ANNOTATION_IPV4_POOLS`].
pub const CALICO_ANNOTATION_IPV6_POOLS: &str = "cni.projectcalico.org/ipv6pools";
/// See [`CALICO_ANNOTATION_IPV4_POOLS`].
pub const CALICO_ANNOTATION_IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";

/// Where a document came from, for error messages: `pools.yaml: document 2 (line 9)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// The file as the user named it (`-` for standard input).
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
    /// 1-based index inside a `kind: List`, if the object came from one.
    pub item: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {} (line {})", self.file, self.document, self.line)?;
        if let Some(item) = self.item {
            write!(f, ", item {item}")?;
        }
        Ok(())
    }
}

/// Errors in the documents a user gave.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The file or directory could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The path as given.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The text is not valid YAML.
    #[error("{at}: not valid YAML: {message}")]
    Yaml {
        /// The document.
        at: Location,
        /// The parser's message.
        message: String,
    },
    /// The document is not a kind poolwarden knows.
    #[error("{at}: {message}")]
    Kind {
        /// The document.
        at: Location,
        /// What is wrong with `apiVersion`/`kind`.
        message: String,
    },
    /// A field has a wrong, missing or unknown value.
    #[error("{at}: {object}: field {field}: {message}")]
    Field {
        /// The document.
        at: Location,
        /// The object, for example `IPPool "external-pool"`.
        object: String,
        /// The field path, for example `spec.blockSize`.
        field: String,
        /// What is wrong, quoting the value.
        message: String,
    },
}

/// Kubernetes object metadata; the fields a server fills in are accepted and ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// The object's name.
    #[serde(default)]
    pub name: String,
    /// Labels (selectors match on these).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations (pool assignments live here for namespaces and pods).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing)]
    namespace: Option<Value>,
    #[serde(default, skip_serializing)]
    uid: Option<Value>,
    #[serde(default, skip_serializing)]
    resource_version: Option<Value>,
    #[serde(default, skip_serializing)]
    creation_timestamp: Option<Value>,
    #[serde(default, skip_serializing)]
    generation: Option<Value>,
    #[serde(default, skip_serializing)]
    managed_fields: Option<Value>,
    #[serde(default, skip_serializing)]
    finalizers: Option<Value>,
    #[serde(default, skip_serializing)]
    self_link: Option<Value>,
}

impl ObjectMeta {
    /// Metadata with just a name.
    pub fn named(name: &str) -> Self {
        Self { name: name.to_string(), ..Self::default() }
    }
}

/// Encapsulation for traffic between nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncapMode {
    /// No encapsulation.
    #[default]
    Never,
    /// Always encapsulate.
    Always,
    /// Encapsulate only to nodes in another subnet.
    CrossSubnet,
}

/// What a pool's addresses may be used for (Calico's `allowedUses`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AllowedUse {
    /// Pod addresses.
    Workload,
    /// Tunnel device addresses.
    Tunnel,
    /// Service load balancer addresses.
    LoadBalancer,
}

/// Source-address enforcement for a pool's pods, overriding the agent's `--enforcement`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnforcementMode {
    /// A pod may send only from its own addresses.
    Strict,
    /// A pod may send from any address of its pool.
    Pool,
    /// No enforcement for this pool's pods.
    Off,
}

/// Whether a pool is used for pods that did not ask for it by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignmentMode {
    /// Used by default when its selectors admit the pod.
    #[default]
    Automatic,
    /// Used only when named by an annotation or the network configuration.
    Manual,
}

fn default_allowed_uses() -> Vec<AllowedUse> {
    vec![AllowedUse::Workload, AllowedUse::Tunnel]
}

fn is_default_allowed_uses(uses: &[AllowedUse]) -> bool {
    uses == default_allowed_uses().as_slice()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The spec of an `IPPool`, as written by the user (Calico's field names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    /// The pool's range, for example `10.0.0.0/26` or `fd00::/112`.
    #[serde(deserialize_with = "cidr_field")]
    pub cidr: IpNet,
    /// Prefix length of the blocks nodes claim; absent means 26 (IPv4) or 122 (IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    /// A disabled pool hands out no new addresses; existing ones stay.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Nodes that may use the pool.
    #[serde(default, skip_serializing_if = "Selector::is_all")]
    pub node_selector: Selector,
    /// Namespaces (by label) that may use the pool.
    #[serde(default, skip_serializing_if = "Selector::is_all")]
    pub namespace_selector: Selector,
    /// The only namespaces that may ever receive addresses from this pool (empty: no restriction).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_namespaces: Vec<String>,
    /// Masquerade traffic from the pool to destinations outside every pool.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nat_outgoing: bool,
    /// IP-in-IP encapsulation between nodes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub ipip_mode: EncapMode,
    /// VXLAN encapsulation between nodes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub vxlan_mode: EncapMode,
    /// What the addresses may be used for.
    #[serde(default = "default_allowed_uses", skip_serializing_if = "is_default_allowed_uses")]
    pub allowed_uses: Vec<AllowedUse>,
    /// Calico's BGP export switch, kept for compatibility (poolwarden does not speak BGP).
    #[serde(default, rename = "disableBGPExport", skip_serializing_if = "is_false")]
    pub disable_bgp_export: bool,
    /// Automatic pools serve pods that name no pool; manual ones only those that do.
    #[serde(default, skip_serializing_if = "is_default")]
    pub assignment_mode: AssignmentMode,
    /// Ours: enforcement for this pool's pods, overriding the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementMode>,
}

fn cidr_field<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not a CIDR: expected an address and a prefix length, such as 10.0.0.0/16 or fd00::/48"
        ))
    })
}

/// A validated IP pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPool {
    /// Kubernetes-style metadata; `name` is the pool's name.
    pub metadata: ObjectMeta,
    /// The pool's settings.
    pub spec: IpPoolSpec,
}

impl IpPool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The pool's range.
    pub fn cidr(&self) -> IpNet {
        self.spec.cidr
    }

    /// The effective block prefix length.
    pub fn block_size(&self) -> u8 {
        self.spec.block_size.unwrap_or(match self.spec.cidr {
            IpNet::V4(_) => 26,
            IpNet::V6(_) => 122,
        })
    }

    /// Whether the pool is IPv6.
    pub fn is_ipv6(&self) -> bool {
        matches!(self.spec.cidr, IpNet::V6(_))
    }

    /// Whether the address lies in the pool.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.spec.cidr.contains(&ip)
    }

    /// The number of addresses in the pool (saturating for very large IPv6 pools).
    pub fn size(&self) -> u128 {
        prefix_size(self.spec.cidr)
    }
}

/// The number of addresses in a prefix, saturating at `u128::MAX`.
pub fn prefix_size(net: IpNet) -> u128 {
    let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// Cluster-wide IPAM settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfigSpec {
    /// Never borrow addresses from blocks affine to other nodes.
    #[serde(default)]
    pub strict_affinity: bool,
    /// The most blocks one node may claim (0: no limit).
    #[serde(default)]
    pub max_blocks_per_host: u32,
    /// A released address is not handed out again for this long.
    #[serde(default)]
    pub reuse_cooldown_seconds: u64,
    /// An empty block stays with its node this long before it goes back to the pool.
    #[serde(default = "default_block_release_grace")]
    pub empty_block_grace_seconds: u64,
    /// Calico's `autoAllocateBlocks`, accepted for compatibility; must be true.
    #[serde(default, skip_serializing)]
    auto_allocate_blocks: Option<bool>,
}

/// The default grace period before an empty block goes back to its pool.
pub const DEFAULT_EMPTY_BLOCK_GRACE_SECONDS: u64 = 300;

fn default_block_release_grace() -> u64 {
    DEFAULT_EMPTY_BLOCK_GRACE_SECONDS
}

/// The one `IPAMConfig` of a cluster (named `default`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// Always `default`.
    pub metadata: ObjectMeta,
    /// The settings.
    pub spec: IpamConfigSpec,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            metadata: ObjectMeta::named("default"),
            spec: IpamConfigSpec { empty_block_grace_seconds: DEFAULT_EMPTY_BLOCK_GRACE_SECONDS, ..Default::default() },
        }
    }
}

/// A namespace in standalone mode: what Kubernetes would otherwise provide.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Name, labels and annotations.
    pub metadata: ObjectMeta,
}

impl Namespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

/// A document understood and validated on its own.
#[expect(clippy::large_enum_variant, reason = "documents are parsed once per apply; boxing would buy nothing")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    /// An `IPPool`.
    IpPool(IpPool),
    /// The `IPAMConfig`.
    IpamConfig(IpamConfig),
    /// A standalone `Namespace`.
    Namespace(Namespace),
}

impl Resource {
    /// `IPPool "name"`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Resource::IpPool(p) => format!("IPPool {:?}", p.metadata.name),
            Resource::IpamConfig(c) => format!("IPAMConfig {:?}", c.metadata.name),
            Resource::Namespace(n) => format!("Namespace {:?}", n.metadata.name),
        }
    }
}

/// A resource and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The validated resource.
    pub resource: Resource,
    /// Its file and document.
    pub at: Location,
}

/// Read every document from the files and directories given (`-` is standard input), in order.
/// A directory contributes its `.yaml`, `.yml` and `.json` files in name order.
/// `stdin` is the text `-` stands for (read by the caller).
pub fn read_paths(paths: &[String], stdin: Option<&str>) -> Result<Vec<Located>, ResourceError> {
    let mut out = Vec::new();
    for path in paths {
        let read_err = |source| ResourceError::Read { path: path.clone(), source };
        if path == "-" {
            out.extend(parse_documents("<stdin>", stdin.unwrap_or_default())?);
            continue;
        }
        let meta = std::fs::metadata(path).map_err(read_err)?;
        if meta.is_dir() {
            let mut files: Vec<_> = std::fs::read_dir(path)
                .map_err(read_err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")))
                .collect();
            files.sort();
            for file in files {
                out.extend(read_file(&file)?);
            }
        } else {
            out.extend(read_file(Path::new(path))?);
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<Located>, ResourceError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ResourceError::Read { path: shown.clone(), source })?;
    parse_documents(&shown, &text)
}

/// Split a YAML stream at `---` lines, returning each document's text and starting line.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((i + 2, String::new()));
            continue;
        }
        if let Some((_, doc)) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

/// Parse and validate every document in `text`; `file` names it in errors.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Located>, ResourceError> {
    let mut out = Vec::new();
    let mut document = 0;
    for (line, doc) in split_documents(text) {
        let has_content = doc.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#') && l != "..."
        });
        if !has_content {
            continue;
        }
        document += 1;
        let at = Location { file: file.to_string(), document, line, item: None };
        let value: Value = serde_yaml::from_str(&doc).map_err(|e| {
            let message = match e.location() {
                Some(loc) => format!("{} (line {})", strip_location(&e.to_string()), line + loc.line() - 1),
                None => e.to_string(),
            };
            ResourceError::Yaml { at: at.clone(), message }
        })?;
        parse_value(value, at, &mut out)?;
    }
    Ok(out)
}

fn strip_location(message: &str) -> &str {
    message.split(" at line ").next().unwrap_or(message)
}

fn field_str<'a>(value: &'a Value, field: &str, at: &Location) -> Result<&'a str, ResourceError> {
    match value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ResourceError::Kind {
            at: at.clone(),
            message: format!("field {field}: expected a string, found {}", brief(other)),
        }),
        None => Err(ResourceError::Kind { at: at.clone(), message: format!("missing field {field}") }),
    }
}

fn brief(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| format!("{value:?}"))
}

fn parse_value(value: Value, at: Location, out: &mut Vec<Located>) -> Result<(), ResourceError> {
    if !value.is_mapping() {
        return Err(ResourceError::Kind {
            at,
            message: format!("expected a document with apiVersion and kind, found {}", brief(&value)),
        });
    }
    let api_version = field_str(&value, "apiVersion", &at)?.to_string();
    let kind = field_str(&value, "kind", &at)?.to_string();
    let ours = api_version == API_VERSION || api_version == CALICO_API_VERSION;
    let resource = match (kind.as_str(), api_version.as_str()) {
        ("IPPool", _) if ours => Resource::IpPool(typed::<PoolDocument>(value, &at, "IPPool")?.validate(&at)?),
        ("IPAMConfig" | "IPAMConfiguration", _) if ours => {
            Resource::IpamConfig(typed::<ConfigDocument>(value, &at, &kind)?.validate(&at)?)
        }
        ("Namespace", "v1") => Resource::Namespace(typed::<NamespaceDocument>(value, &at, "Namespace")?.validate(&at)?),
        ("List" | "NamespaceList" | "IPPoolList", _) => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => return Err(ResourceError::Kind { at, message: format!("{kind} without an items list") }),
            };
            for (i, item) in items.into_iter().enumerate() {
                parse_value(item, Location { item: Some(i + 1), ..at.clone() }, out)?;
            }
            return Ok(());
        }
        ("IPPool" | "IPAMConfig" | "IPAMConfiguration", other) => {
            return Err(ResourceError::Kind {
                at,
                message: format!(
                    "apiVersion {other:?} is not supported for {kind}: use {API_VERSION} or {CALICO_API_VERSION}"
                ),
            });
        }
        ("Namespace", other) => {
            return Err(ResourceError::Kind {
                at,
                message: format!("apiVersion {other:?} is not supported for Namespace: use v1"),
            });
        }
        (other, _) => {
            return Err(ResourceError::Kind {
                at,
                message: format!(
                    "unknown kind {other:?} (apiVersion {api_version:?}): poolwarden accepts IPPool, IPAMConfig and Namespace"
                ),
            });
        }
    };
    out.push(Located { resource, at });
    Ok(())
}

fn typed<T: DeserializeOwned>(value: Value, at: &Location, kind: &str) -> Result<T, ResourceError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map_or_else(|| kind.to_string(), |n| format!("{kind} {n:?}"));
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let missing = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`'));
        let (field, message) = match missing {
            Some(child) if path == "." => (child.to_string(), "missing (required)".to_string()),
            Some(child) => (format!("{path}.{child}"), "missing (required)".to_string()),
            None => (path, message),
        };
        ResourceError::Field { at: at.clone(), object: name, field, message }
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PoolDocument {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    spec: IpPoolSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigDocument {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<IpamConfigSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespaceDocument {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    #[serde(default, rename = "spec")]
    _spec: Option<Value>,
    #[serde(default, rename = "status")]
    _status: Option<Value>,
}

struct FieldCheck<'a> {
    at: &'a Location,
    object: String,
}

impl FieldCheck<'_> {
    fn fail(&self, field: &str, message: impl Into<String>) -> ResourceError {
        ResourceError::Field {
            at: self.at.clone(),
            object: self.object.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Whether `name` is a valid Kubernetes object name (DNS-1123 subdomain).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn check_name(check: &FieldCheck<'_>, name: &str) -> Result<(), ResourceError> {
    if name.is_empty() {
        return Err(check.fail("metadata.name", "missing (required): every object needs a name"));
    }
    if !valid_name(name) {
        return Err(check.fail(
            "metadata.name",
            format!("{name:?} is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"),
        ));
    }
    Ok(())
}

impl PoolDocument {
    fn validate(self, at: &Location) -> Result<IpPool, ResourceError> {
        let object = if self.metadata.name.is_empty() {
            "IPPool (unnamed)".into()
        } else {
            format!("IPPool {:?}", self.metadata.name)
        };
        let check = FieldCheck { at, object };
        check_name(&check, &self.metadata.name)?;
        let pool = IpPool { metadata: self.metadata, spec: self.spec };
        validate_pool_spec(&pool).map_err(|(field, message)| check.fail(field, message))?;
        Ok(pool)
    }
}

/// Check an IP pool on its own (not against other pools): returns the field and the problem.
pub fn validate_pool_spec(pool: &IpPool) -> Result<(), (&'static str, String)> {
    let spec = &pool.spec;
    let cidr = spec.cidr;
    if cidr.trunc() != cidr {
        return Err(("spec.cidr", format!("{cidr} has host bits set: the pool's network is {}", cidr.trunc())));
    }
    let (range, family) = if pool.is_ipv6() { (116..=128, "IPv6") } else { (20..=32, "IPv4") };
    let block = pool.block_size();
    if !range.contains(&block) {
        return Err((
            "spec.blockSize",
            format!("{block} is out of range: {family} block sizes are {} to {}", range.start(), range.end()),
        ));
    }
    if block < cidr.prefix_len() {
        return Err((
            "spec.blockSize",
            format!(
                "{block} is larger than the pool {cidr}: a block cannot be bigger than its pool (use {} or more)",
                cidr.prefix_len()
            ),
        ));
    }
    for ns in &spec.allowed_namespaces {
        if !valid_name(ns) || ns.contains('.') {
            return Err(("spec.allowedNamespaces", format!("{ns:?} is not a valid namespace name")));
        }
    }
    if spec.ipip_mode != EncapMode::Never && spec.vxlan_mode != EncapMode::Never {
        return Err(("spec.vxlanMode", "ipipMode and vxlanMode cannot both be enabled on one pool".to_string()));
    }
    if pool.is_ipv6() && spec.ipip_mode != EncapMode::Never {
        return Err((
            "spec.ipipMode",
            format!("{:?} is not possible for an IPv6 pool: IP-in-IP carries IPv4 only", spec.ipip_mode),
        ));
    }
    if spec.allowed_uses.is_empty() {
        return Err(("spec.allowedUses", "an empty list leaves the pool with no use".to_string()));
    }
    Ok(())
}

impl ConfigDocument {
    fn validate(self, at: &Location) -> Result<IpamConfig, ResourceError> {
        let check = FieldCheck { at, object: format!("IPAMConfig {:?}", self.metadata.name) };
        if self.metadata.name != "default" {
            return Err(check.fail(
                "metadata.name",
                format!("{:?}: the one IPAMConfig must be named \"default\"", self.metadata.name),
            ));
        }
        let spec = self.spec.unwrap_or_else(|| IpamConfig::default().spec);
        if spec.auto_allocate_blocks == Some(false) {
            return Err(
                check.fail("spec.autoAllocateBlocks", "false is not supported: nodes always claim blocks on demand")
            );
        }
        Ok(IpamConfig { metadata: self.metadata, spec })
    }
}

impl NamespaceDocument {
    fn validate(self, at: &Location) -> Result<Namespace, ResourceError> {
        let check = FieldCheck { at, object: format!("Namespace {:?}", self.metadata.name) };
        check_name(&check, &self.metadata.name)?;
        if self.metadata.name.contains('.') {
            return Err(
                check.fail("metadata.name", format!("{:?}: namespace names cannot contain '.'", self.metadata.name))
            );
        }
        for (key, value) in &self.metadata.annotations {
            check_pool_annotation(key, value)
                .map_err(|message| check.fail(&format!("metadata.annotations[{key:?}]"), message))?;
        }
        Ok(Namespace { metadata: self.metadata })
    }
}

/// Check the value of one of the pool or address annotations; other annotations are not ours to judge.
pub fn check_pool_annotation(key: &str, value: &str) -> Result<(), String> {
    let is_pools =
        [ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS, CALICO_ANNOTATION_IPV4_POOLS, CALICO_ANNOTATION_IPV6_POOLS]
            .contains(&key);
    let is_addrs = [ANNOTATION_IP_ADDRS, CALICO_ANNOTATION_IP_ADDRS].contains(&key);
    if !is_pools && !is_addrs {
        return Ok(());
    }
    let items: Vec<String> = serde_json::from_str(value)
        .map_err(|_| format!("{value:?} is not a JSON list of strings, for example '[\"external-pool\"]'"))?;
    if is_addrs {
        for item in &items {
            item.parse::<IpAddr>().map_err(|_| format!("{item:?} is not an IP address"))?;
        }
    }
    Ok(())
}

/// Render resources the way `kubectl get -o yaml` would (one document each, `---` between).
pub fn to_yaml_documents<T: Serialize>(kind: &str, items: &[T]) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let mut value = serde_yaml::to_value(item).unwrap_or(Value::Null);
        if let Value::Mapping(map) = &mut value {
            let mut doc = serde_yaml::Mapping::new();
            let api = if kind == "Namespace" { "v1" } else { API_VERSION };
            doc.insert("apiVersion".into(), api.into());
            doc.insert("kind".into(), kind.into());
            for (k, v) in map.iter() {
                doc.insert(k.clone(), v.clone());
            }
            value = Value::Mapping(doc);
        }
        out.push_str(&serde_yaml::to_string(&value).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const SEED_POOLS: &str = include_str!("../../../examples/calico/seed-pools.yaml");

    #[test]
    fn seed_pools_parse_unchanged() {
        let docs = parse_documents("pools.yaml", SEED_POOLS).unwrap();
        assert_eq!(docs.len(), 2);
        let Resource::IpPool(pool) = &docs[1].resource else { panic!("not a pool: {docs:?}") };
        assert_eq!(pool.name(), "internal-pool");
        assert_eq!(pool.block_size(), 29);
        assert_eq!(pool.spec.ipip_mode, EncapMode::Always);
        assert!(pool.spec.nat_outgoing);
        assert_eq!(docs[1].at, Location { file: "pools.yaml".into(), document: 2, line: 12, item: None });
    }

    /// `spec.properties` of the v1 schema of the custom resource `name` in deploy/crds.yaml.
    fn crd_spec_fields(name: &str) -> BTreeSet<String> {
        let crds = include_str!("../../../deploy/crds.yaml");
        let crd = serde_yaml::Deserializer::from_str(crds)
            .map(|doc| Value::deserialize(doc).expect("deploy/crds.yaml is YAML"))
            .find(|doc| doc["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("deploy/crds.yaml has no {name}"));
        let Value::Mapping(fields) =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        else {
            panic!("{name} has no spec properties")
        };
        fields.keys().map(|k| k.as_str().expect("field name").to_string()).collect()
    }

    fn written_fields<T: Serialize>(spec: &T) -> BTreeSet<String> {
        let Value::Mapping(fields) = serde_yaml::to_value(spec).expect("spec serialises") else { panic!() };
        fields.keys().map(|k| k.as_str().expect("field name").to_string()).collect()
    }

    /// The custom resources accept exactly the fields `apply` does: every field of a spec that sets all of
    /// them (none at its default, so none is skipped) is in the schema, and the schema has no other.
    #[test]
    fn the_crds_have_the_fields_apply_reads() {
        let pool = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: all}\nspec:\n  cidr: 10.0.0.0/16\n  \
                    blockSize: 28\n  disabled: true\n  nodeSelector: \"zone == 'a'\"\n  namespaceSelector: has(team)\n  \
                    allowedNamespaces: [a]\n  natOutgoing: true\n  ipipMode: Always\n  allowedUses: [Workload]\n  \
                    disableBGPExport: true\n  assignmentMode: Manual\n  enforcement: Pool\n";
        let Resource::IpPool(pool) = &parse_documents("all.yaml", pool).unwrap()[0].resource else { panic!() };
        let mut fields = written_fields(&pool.spec);
        // vxlanMode cannot be set beside ipipMode; it is a field all the same.
        fields.insert("vxlanMode".into());
        assert_eq!(crd_spec_fields("ippools.poolwarden.io"), fields);

        let config = IpamConfigSpec {
            strict_affinity: true,
            max_blocks_per_host: 1,
            reuse_cooldown_seconds: 1,
            empty_block_grace_seconds: 1,
            auto_allocate_blocks: Some(true),
        };
        let mut fields = written_fields(&config);
        // Accepted (when true) for Calico's sake, never written back.
        fields.insert("autoAllocateBlocks".into());
        assert_eq!(crd_spec_fields("ipamconfigs.poolwarden.io"), fields);
    }

    #[test]
    fn defaults_block_size_by_family() {
        let v6 = "apiVersion: poolwarden.io/v1\nkind: IPPool\nmetadata: {name: six}\nspec: {cidr: 'fd00::/64'}\n";
        let Resource::IpPool(pool) = &parse_documents("f", v6).unwrap()[0].resource else { panic!() };
        assert_eq!(pool.block_size(), 122);
    }

    #[test]
    fn reads_kubectl_namespace_list() {
        let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    annotations:
      poolwarden.io/ipv4pools: '[\"external-pool\"]'
    creationTimestamp: \"2026-01-01T00:00:00Z\"
    labels:
      kubernetes.io/metadata.name: external-ns
    name: external-ns
    resourceVersion: \"42\"
    uid: 0b3c
  spec:
    finalizers: [kubernetes]
  status:
    phase: Active
metadata:
  resourceVersion: \"\"
";
        let docs = parse_documents("ns.yaml", text).unwrap();
        let Resource::Namespace(ns) = &docs[0].resource else { panic!() };
        assert_eq!(ns.name(), "external-ns");
        assert_eq!(ns.metadata.annotations[ANNOTATION_IPV4_POOLS], "[\"external-pool\"]");
        assert_eq!(docs[0].at.item, Some(1));
    }
}
