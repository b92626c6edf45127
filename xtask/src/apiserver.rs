//! The real kube-apiserver (and etcd) from `../shared/k8s-apiserver/`, for the Kubernetes
//! tests: built once (idempotent), started for the test run, stopped on drop.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

/// Port of the test API server (etcd uses PORT+6000..+6002).
const PORT: &str = "16443";

pub struct ApiServer {
    scripts: PathBuf,
    dir: PathBuf,
    pub kubeconfig: PathBuf,
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
            .arg(dir)
            .status();
        let _ = std::fs::remove_dir_all(dir);
        let out = Command::new("bash")
            .arg(scripts.join("start.sh"))
            .arg(dir)
            .arg(PORT)
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
            dir: dir.to_path_buf(),
            kubeconfig,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop.sh"))
            .arg(&self.dir)
            .status();
    }
}
