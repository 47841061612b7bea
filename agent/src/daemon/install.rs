//! What the DaemonSet's init step puts on a node (the plugin binary and the conflist, each replaced
//! atomically so kubelet never reads half a file), and what uninstalling takes away again: the conflist and
//! the plugin, every route with our protocol, the overlay device, the NAT table and the pinned enforcement.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use crate::dataplane::{nat::Nat, routes::Routes};

/// The conflist's file name: sorted first among the usual `10-...` files only by name, as Calico's is.
pub const CONFLIST_NAME: &str = "10-poolwarden.conflist";

/// Errors installing or uninstalling.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read, written or removed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The conflist given is not one poolwarden can serve.
    #[error("{path}: {message}")]
    Conflist {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The node's routes or overlay could not be removed.
    #[error(transparent)]
    Routes(#[from] crate::dataplane::routes::RouteError),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::File { path: path.to_path_buf(), source }
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = dir.join(format!(".{name}.poolwarden-tmp"));
    std::fs::write(&temporary, bytes).map_err(file_error(&temporary))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).map_err(file_error(&temporary))?;
    std::fs::rename(&temporary, path).map_err(file_error(path))
}

/// Check that `text` is a conflist whose first plugin is poolwarden-cni.
pub fn check_conflist(path: &Path, text: &str) -> Result<(), InstallError> {
    let fail = |message: String| InstallError::Conflist { path: path.to_path_buf(), message };
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| fail(format!("not JSON: {e}")))?;
    for field in ["cniVersion", "name"] {
        if !value[field].is_string() {
            return Err(fail(format!("field {field} is missing")));
        }
    }
    match value["plugins"][0]["type"].as_str() {
        Some("poolwarden-cni") => Ok(()),
        other => Err(fail(format!("the first plugin must be of type poolwarden-cni, not {other:?}"))),
    }
}

/// Install `plugin` into `bin_dir` and `conflist` into `conf_dir`; returns the two paths written.
pub fn install_cni(
    plugin: &Path,
    bin_dir: &Path,
    conflist: &Path,
    conf_dir: &Path,
) -> Result<(PathBuf, PathBuf), InstallError> {
    let text = std::fs::read_to_string(conflist).map_err(file_error(conflist))?;
    check_conflist(conflist, &text)?;
    let binary = std::fs::read(plugin).map_err(file_error(plugin))?;
    let installed_plugin = bin_dir.join("poolwarden-cni");
    replace(&installed_plugin, &binary, 0o755)?;
    let installed_conf = conf_dir.join(CONFLIST_NAME);
    replace(&installed_conf, text.as_bytes(), 0o644)?;
    Ok((installed_plugin, installed_conf))
}

/// What uninstalling removed.
#[derive(Debug, Default)]
pub struct Removed {
    /// Files removed (conflist, plugin).
    pub files: Vec<PathBuf>,
    /// Routes with our protocol removed.
    pub routes: usize,
    /// Whether the pinned enforcement directory was removed.
    pub pins: bool,
}

/// Remove what poolwarden put on this node. Run it after the agent is gone and the node's pods are
/// deleted: it does not touch pods' interfaces.
pub async fn uninstall(bin_dir: &Path, conf_dir: &Path, bpf_dir: &Path) -> Result<Removed, InstallError> {
    let mut removed = Removed::default();
    for path in [conf_dir.join(CONFLIST_NAME), bin_dir.join("poolwarden-cni")] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.files.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::File { path, source: e }),
        }
    }
    let routes = Routes::connect()?;
    removed.routes = routes.reconcile(&BTreeSet::new()).await?.1;
    crate::dataplane::overlay::Overlay::new(routes.clone()).remove().await?;
    // Without nft installed there is no table of ours either.
    let _ = Nat::remove();
    // Unpinning the links detaches the programs; unpinning the maps frees them.
    match std::fs::remove_dir_all(bpf_dir) {
        Ok(()) => removed.pins = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(InstallError::File { path: bpf_dir.to_path_buf(), source: e }),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_atomically_and_refuses_a_foreign_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin");
        std::fs::write(&plugin, b"\x7fELF...").unwrap();
        let conflist = dir.path().join("in.conflist");
        std::fs::write(&conflist, r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge"}]}"#)
            .unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        let err = install_cni(&plugin, &bin, &conflist, &conf).unwrap_err();
        assert!(err.to_string().contains("must be of type poolwarden-cni"), "{err}");
        std::fs::write(
            &conflist,
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"poolwarden-cni"}]}"#,
        )
        .unwrap();
        let (p, c) = install_cni(&plugin, &bin, &conflist, &conf).unwrap();
        assert_eq!(std::fs::read(p).unwrap(), b"\x7fELF...");
        assert!(std::fs::read_to_string(c).unwrap().contains("poolwarden-cni"));
        let leftovers: Vec<_> = std::fs::read_dir(&conf).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(CONFLIST_NAME)]);
    }
}
