//! OCI image archives made here from local files (no registry is reachable): the test cluster's pause image,
//! its pods' HTTP server image (busybox-static), and poolwarden's own image from its release binaries.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::json;

/// One file of an image: where it comes from, where it goes in the image, its mode.
pub struct File {
    pub source: PathBuf,
    pub dest: String,
    pub mode: u32,
}

impl File {
    /// `source` at `dest`, executable.
    pub fn program(source: impl Into<PathBuf>, dest: &str) -> Self {
        Self { source: source.into(), dest: dest.to_string(), mode: 0o755 }
    }
}

/// Programs of this machine with the shared libraries they load (as `ldd` lists them), at the same paths.
pub fn with_libraries(programs: &[(&Path, &str)]) -> Result<Vec<File>> {
    let mut files: Vec<File> = Vec::new();
    for (program, dest) in programs {
        files.push(File::program(*program, dest));
        let out = Command::new("ldd").arg(program).output().context("run ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/'))
                && !files.iter().any(|f| f.dest == path)
            {
                // The file itself, not the link the path may be.
                let real = std::fs::canonicalize(path).with_context(|| format!("resolve {path}"))?;
                files.push(File { source: real, dest: path.to_string(), mode: 0o755 });
            }
        }
    }
    Ok(files)
}

/// An image to build.
pub struct Image<'a> {
    /// Its full reference (`pwk.invalid/pause:3.10`).
    pub name: &'a str,
    pub files: Vec<File>,
    /// Symbolic links: (path in the image, target).
    pub links: Vec<(&'a str, &'a str)>,
    pub entrypoint: Vec<&'a str>,
    pub cmd: Vec<&'a str>,
}

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("run sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// Write `bytes` as a blob of the layout under `blobs`; returns its digest and size.
fn blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let staging = blobs.join("staging");
    std::fs::write(&staging, bytes)?;
    let digest = sha256(&staging)?;
    std::fs::rename(&staging, blobs.join(&digest))?;
    Ok((format!("sha256:{digest}"), bytes.len()))
}

/// Build `image` as an OCI archive (`oci-layout`, `index.json`, `blobs/`), in `work`; returns its path.
/// The layer is a reproducible tar (sorted, owned by root, dated 0).
pub fn build(image: &Image<'_>, work: &Path) -> Result<PathBuf> {
    let _ = std::fs::remove_dir_all(work);
    let rootfs = work.join("rootfs");
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&rootfs)?;
    std::fs::create_dir_all(&blobs)?;
    for file in &image.files {
        let dest = rootfs.join(file.dest.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap_or(&rootfs))?;
        std::fs::copy(&file.source, &dest).with_context(|| format!("copy {}", file.source.display()))?;
        std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(file.mode))?;
    }
    for (path, target) in &image.links {
        let link = rootfs.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(link.parent().unwrap_or(&rootfs))?;
        std::os::unix::fs::symlink(target, &link)?;
    }
    for dir in ["tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    let layer = work.join("layer.tar");
    reproducible_tar(&rootfs, &layer)?;
    let layer_digest = format!("sha256:{}", sha256(&layer)?);
    let layer_size = std::fs::metadata(&layer)?.len();
    std::fs::rename(&layer, blobs.join(layer_digest.trim_start_matches("sha256:")))?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": image.entrypoint, "Cmd": image.cmd, "Env": ["PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let (config_digest, config_size) = blob(&blobs, config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size },
        "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size } ],
    });
    let (manifest_digest, manifest_size) = blob(&blobs, manifest.to_string().as_bytes())?;
    let tag = image.name.rsplit_once(':').map_or("latest", |(_, tag)| tag);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [ {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "io.containerd.image.name": image.name, "org.opencontainers.image.ref.name": tag },
        } ],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let archive = work.join("image.tar");
    reproducible_tar(&layout, &archive)?;
    Ok(archive)
}

/// `dir`'s contents as a tar at `out` that is the same for the same files: sorted, owned by root, dated 0.
fn reproducible_tar(dir: &Path, out: &Path) -> Result<()> {
    let status = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .context("run tar")?;
    if !status.success() {
        bail!("tar of {} failed", dir.display());
    }
    Ok(())
}
