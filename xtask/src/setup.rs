//! Idempotent machine set-up: each step checks first and prints what it found or did.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// Debian packages: bpftool (map dumps, tests), iproute2 (namespaces, veth, tc), util-linux
/// (nsenter), tcpdump (debugging the datapath), openssl and curl (the test API server's
/// certificates and readiness check), iptables and nftables (kube-proxy's data paths, the
/// benchmark's baselines), fonts-dejavu-core (the benchmark's plots), ethtool (the XDP
/// tests' veth offloads), mmdebstrap, podman and runc (the container image, built and run
/// without a registry).
const APT_PACKAGES: [&str; 13] = [
    "bpftool",
    "ethtool",
    "iproute2",
    "util-linux",
    "tcpdump",
    "openssl",
    "curl",
    "iptables",
    "nftables",
    "fonts-dejavu-core",
    "mmdebstrap",
    "podman",
    "runc",
];
const BPF_LINKER_VERSION: &str = "^0.13";

fn status(step: &str, what: &str) {
    println!("setup: {step:<12} {what}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .into_iter()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        status("apt", &format!("{} present", APT_PACKAGES.join(", ")));
        return Ok(());
    }
    status("apt", &format!("installing {}", missing.join(", ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        status("nightly", "toolchain present");
    } else {
        status(
            "nightly",
            "installing the nightly toolchain (the eBPF crate needs it)",
        );
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        status("rust-src", "present");
        return Ok(());
    }
    status(
        "rust-src",
        "installing (build-std=core for bpfel-unknown-none)",
    );
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// bpf-linker must link against the same LLVM as the nightly rustc: build it against the
/// shared libLLVM that the nightly toolchain ships.
fn bpf_linker() -> anyhow::Result<()> {
    let cargo_home = cargo_home()?;
    let linker = cargo_home.join("bin/bpf-linker");
    // As aya-build will run it: outside `cargo run`, whose LD_LIBRARY_PATH would hide a
    // broken RUNPATH.
    if succeeds(
        Command::new(&linker)
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH"),
    ) {
        status("bpf-linker", &format!("present ({})", linker.display()));
        return Ok(());
    }
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let soname = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: is the nightly toolchain complete?",
                lib_dir.display()
            )
        })?;
    let major = soname
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        major.parse::<u32>().is_ok(),
        "cannot read the LLVM version from {soname}"
    );
    let prefix = cargo_home.join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    // libLLVM.so for the build, the full soname for bpf-linker's RUNPATH at run time.
    for link in ["libLLVM.so", soname.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&soname), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    status(
        "bpf-linker",
        &format!(
            "building {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
        ),
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&cargo_home)
            .env("LLVM_PREFIX", &prefix),
    )?;
    ensure!(
        succeeds(
            Command::new(&linker)
                .arg("--version")
                .env_remove("LD_LIBRARY_PATH")
        ),
        "{} was installed but does not run",
        linker.display()
    );
    Ok(())
}

/// The maps are pinned on a BPF filesystem.
fn bpffs() -> anyhow::Result<()> {
    let fs_type = output(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]))?;
    if fs_type.trim() == "bpf_fs" {
        status("bpffs", "mounted on /sys/fs/bpf");
        return Ok(());
    }
    status("bpffs", "mounting on /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The socket hooks attach to cgroup v2.
fn cgroup2() -> anyhow::Result<()> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    match mountinfo.lines().find(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|r| r.starts_with("cgroup2 "))
    }) {
        Some(line) => {
            status(
                "cgroup2",
                &format!(
                    "mounted on {}",
                    line.split_whitespace().nth(4).unwrap_or("?")
                ),
            );
            Ok(())
        }
        None => bail!(
            "cgroup v2 is not mounted; mount it (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        ),
    }
}

/// Python packages of the chart tests, in a virtualenv of their own: Helm's Go SDK
/// (helm-python-sdk) and the Kubernetes schemas (kubernetes-validate).
const CHART_TEST_PACKAGES: [&str; 3] = [
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "pyyaml==6.0.2",
];

/// The virtualenv of the chart tests.
pub fn chart_venv(root: &Path) -> PathBuf {
    root.join("target/chart-venv")
}

fn chart_test_tools(root: &Path) -> anyhow::Result<()> {
    let venv = chart_venv(root);
    let python = venv.join("bin/python");
    if succeeds(Command::new(&python).args(["-c", "import helm_python, kubernetes_validate, yaml"]))
    {
        status("chart-tests", &format!("present ({})", venv.display()));
        return Ok(());
    }
    status(
        "chart-tests",
        &format!(
            "installing {} into {}",
            CHART_TEST_PACKAGES.join(", "),
            venv.display()
        ),
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q"])
        .args(CHART_TEST_PACKAGES))
}

/// Everything: to build, run and test.
pub fn run_all(root: &Path) -> anyhow::Result<()> {
    apt_packages()?;
    build_tools()?;
    chart_test_tools(root)?;
    bpffs()?;
    cgroup2()?;
    status("done", "");
    Ok(())
}

/// What building needs (e.g. in a container image build): the nightly's rust-src and
/// bpf-linker.
pub fn build_tools() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}
