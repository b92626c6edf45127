//! The agent's container image without a container registry: this machine reaches Debian's
//! package mirror but no registry, so the Dockerfile's base images cannot be pulled. The
//! same content is assembled instead — a Debian bookworm root file system made by
//! `mmdebstrap` from the package mirror (ca-certificates, iptables, nftables, mount) plus the
//! project's binaries — imported with `podman import` (daemonless), and checked by running
//! it: `--version`, the tools the chart's init containers use, and a short standalone run
//! with the chart's capabilities alone. Containers run with `runc` (crun refuses this
//! host's hybrid cgroup layout) in a network namespace of their own with no interface but
//! loopback, the socket hooks on a cgroup made for the check, pins in a directory of their
//! own, all removed afterwards.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

const PACKAGES: &str = "ca-certificates,iptables,nftables,mount";
const BINARIES: [&str; 2] = ["proxy-agent", "proxyctl"];
/// Limits the container starts with, no higher than this machine's: raising one needs
/// CAP_SYS_RESOURCE, which the session's bounding set lacks.
const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn run(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// Builds the image `tag` from the binaries in `bin_dir`; `work` holds the root file system.
pub fn build(bin_dir: &Path, work: &Path, tag: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let rootfs = work.join("rootfs.tar");
    println!("image: mmdebstrap bookworm ({PACKAGES})");
    run(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=apt", &format!("--include={PACKAGES}")])
        .arg("bookworm")
        .arg(&rootfs))?;
    let staged = work.join("add/usr/local/bin");
    std::fs::create_dir_all(&staged)?;
    for binary in BINARIES {
        std::fs::copy(bin_dir.join(binary), staged.join(binary))
            .with_context(|| format!("copying {binary} from {}", bin_dir.display()))?;
    }
    run(Command::new("tar")
        .arg("--append")
        .arg("-f")
        .arg(&rootfs)
        .arg("-C")
        .arg(work.join("add"))
        .args(BINARIES.map(|b| format!("usr/local/bin/{b}"))))?;
    run(podman()
        .args([
            "import",
            "--change",
            r#"ENTRYPOINT ["/usr/local/bin/proxy-agent"]"#,
        ])
        .arg(&rootfs)
        .arg(tag))?;
    println!("image: {tag} imported");
    Ok(())
}

/// What the checks made on the host, removed on drop.
struct Made {
    cgroup: PathBuf,
    bpffs: PathBuf,
    container: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "1", &self.container])
            .output();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
fn cgroup2() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// Runs the checks on `tag`; prints one line each and returns (passed, failed).
pub fn check(tag: &str, manifest: &Path) -> anyhow::Result<(u64, u64)> {
    let mut results = Vec::new();
    let mut report = |name: &str, result: anyhow::Result<()>| {
        match &result {
            Ok(()) => println!("ok   {name}"),
            Err(e) => println!("FAIL {name}: {e:#}"),
        }
        results.push(result.is_ok());
    };
    report(
        "image: proxy-agent --version",
        (|| {
            let out = run(podman()
                .args(["run", "--rm", "--network", "none"])
                .args(ULIMITS)
                .arg(tag)
                .arg("--version"))?;
            ensure!(out.starts_with("proxy-userspace "), "printed {out:?}");
            Ok(())
        })(),
    );
    report(
        "image: iptables, nft, sh, mount and mountpoint present",
        (|| {
            run(podman()
                .args(["run", "--rm", "--network", "none", "--entrypoint", "sh"])
                .args(ULIMITS)
                .args([
                    tag,
                    "-c",
                    "command -v iptables-save iptables-restore nft mount mountpoint",
                ]))?;
            Ok(())
        })(),
    );
    report(
        "image: a standalone run with the chart's capabilities syncs, then --cleanup removes it",
        standalone(tag, manifest),
    );
    let passed = results.iter().filter(|ok| **ok).count() as u64;
    Ok((passed, results.len() as u64 - passed))
}

fn standalone(tag: &str, manifest: &Path) -> anyhow::Result<()> {
    let id = std::process::id();
    let made = Made {
        cgroup: cgroup2()?.join(format!("proxy-image-check-{id}")),
        bpffs: PathBuf::from(format!("/sys/fs/bpf/proxy-image-check-{id}")),
        container: format!("proxy-image-check-{id}"),
    };
    std::fs::create_dir(&made.cgroup)
        .with_context(|| format!("creating {}", made.cgroup.display()))?;
    let agent = |name: Option<&str>| {
        let mut command = podman();
        command.arg("run");
        match name {
            Some(name) => command.args(["--detach", "--name", name]),
            None => command.arg("--rm"),
        };
        // As the chart runs it: these capabilities only, seccomp and AppArmor unconfined.
        command
            .args(["--network", "none", "--cap-drop", "all"])
            .args(["--cap-add", "bpf,perfmon,net_admin,sys_admin"])
            .args(["--security-opt", "seccomp=unconfined"])
            .args(["--security-opt", "apparmor=unconfined"])
            .args(ULIMITS)
            .args(["--volume", "/sys/fs/bpf:/sys/fs/bpf"])
            .arg("--volume")
            .arg(format!("{}:/run/proxy/cgroup", made.cgroup.display()))
            .arg("--volume")
            .arg(format!(
                "{}:/run/proxy/services.yaml:ro",
                manifest.display()
            ))
            .arg(tag)
            .arg("--bpffs")
            .arg(&made.bpffs);
        command
    };
    run(agent(Some(&made.container)).args([
        "--cgroup",
        "/run/proxy/cgroup",
        "--manifests",
        "/run/proxy/services.yaml",
    ]))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = podman().args(["logs", &made.container]).output()?;
        let logs = String::from_utf8_lossy(&out.stderr).into_owned();
        if logs.contains("synced") {
            break;
        }
        if Instant::now() > deadline {
            bail!("no sync within 30 s; log:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        made.bpffs.join("links").exists(),
        "nothing pinned under {}",
        made.bpffs.display()
    );
    run(podman().args(["stop", "--time", "10", &made.container]))?;
    run(agent(None).arg("--cleanup"))?;
    ensure!(
        !made.bpffs.exists(),
        "--cleanup left {}",
        made.bpffs.display()
    );
    Ok(())
}
