//! The real kube-apiserver (and etcd) from `../shared/k8s-apiserver/`, for the Kubernetes
//! tests: built once (idempotent), started for the test run, stopped on drop.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

/// Port of the test API server (etcd uses PORT+6000..+6002).
const PORT: &str = "16443";

/// The service ranges: start.sh's IPv4 one and a unique-local IPv6 one (/108: the largest
/// Kubernetes 1.20 allocates from).
const SERVICE_RANGES: &str = "10.96.0.0/16,fd00:96::/108";

pub struct ApiServer {
    scripts: PathBuf,
    dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// The dual-stack `K8S_HOME`, for tests that start API servers of their own.
    pub home: PathBuf,
}

impl ApiServer {
    pub fn start(scripts: &Path, dir: &Path) -> anyhow::Result<Self> {
        ensure!(
            scripts.join("build.sh").is_file(),
            "the Kubernetes tests need the shared kube-apiserver scripts at {} (a `shared` \
             directory beside this checkout); none there: set PROXY_K8S_SCRIPTS to their \
             directory",
            scripts.display()
        );
        println!(
            "xtask: building kube-apiserver and etcd if needed (about 5 minutes the first time)"
        );
        let status = Command::new("bash")
            .arg(scripts.join("build.sh"))
            .status()
            .context("running build.sh")?;
        ensure!(
            status.success(),
            "building kube-apiserver failed ({status})"
        );
        // A previous run's servers, if it was interrupted.
        let _ = Command::new("bash")
            .arg(scripts.join("stop.sh"))
            .arg(dir.join("run"))
            .status();
        let _ = std::fs::remove_dir_all(dir);
        let home = dual_stack_home(dir)?;
        let out = Command::new("bash")
            .arg(scripts.join("start.sh"))
            .arg(dir.join("run"))
            .arg(PORT)
            .env("K8S_HOME", &home)
            .output()
            .context("running start.sh")?;
        ensure!(
            out.status.success(),
            "starting kube-apiserver failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = PathBuf::from(
            stdout
                .lines()
                .last()
                .context("start.sh printed no kubeconfig path")?
                .trim(),
        );
        println!(
            "xtask: kube-apiserver ready, kubeconfig {}",
            kubeconfig.display()
        );
        Ok(Self {
            scripts: scripts.to_path_buf(),
            dir: dir.join("run"),
            kubeconfig,
            home,
        })
    }
}

/// A `K8S_HOME` for start.sh whose kube-apiserver is the built one configured as a
/// dual-stack cluster's (IPv4 first, so Services default to IPv4 as before): IPv6 and
/// dual-stack Services exist only where the service range has an IPv6 half, and start.sh
/// gives only an IPv4 one. Kubernetes 1.20 gates dual-stack (alpha); a repeated flag's last
/// value wins and feature gates add up.
fn dual_stack_home(dir: &Path) -> anyhow::Result<PathBuf> {
    let built = PathBuf::from(
        std::env::var_os("K8S_HOME").unwrap_or_else(|| "/var/cache/k8s-apiserver".into()),
    )
    .join("bin");
    let home = dir.join("home");
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    std::os::unix::fs::symlink(built.join("etcd"), bin.join("etcd"))
        .with_context(|| format!("linking etcd into {}", bin.display()))?;
    let wrapper = bin.join("kube-apiserver");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' \"$@\" --service-cluster-ip-range={SERVICE_RANGES} \\\n  \
             --feature-gates=IPv6DualStack=true\n",
            built.join("kube-apiserver").display()
        ),
    )
    .with_context(|| format!("writing {}", wrapper.display()))?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .with_context(|| format!("making {} executable", wrapper.display()))?;
    Ok(home)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop.sh"))
            .arg(&self.dir)
            .status();
    }
}
