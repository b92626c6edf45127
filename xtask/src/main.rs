//! Project tasks: `cargo xtask setup | test | demo | bench | image`. `test` and `demo` run `setup` first,
//! which installs what is missing on a fresh machine and skips what is there.
mod apiserver;
mod image;
mod setup;

use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, set-up, test and demo tasks for the eBPF service proxy")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs (apt packages, nightly rust-src, bpf-linker, chart
    /// test tools, bpffs).
    Setup {
        /// Only what building needs (nightly rust-src, bpf-linker), e.g. in an image build.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, then run the whole test suite (unit and namespace integration tests; root).
    Test,
    /// Set up, then run the demo: a namespace world with ClusterIP traffic through the agent.
    Demo,
    /// Set up, then build the agent's container image (release binaries) into podman's
    /// local storage, and check it.
    Image {
        #[arg(long, default_value = "localhost/ebpf-proxy:0.1.0")]
        tag: String,
    },
    /// Set up, then run the benchmark; writes target/bench/results.md.
    Bench {
        /// The smallest size only, with fewer runs: checks the benchmark works.
        #[arg(long)]
        quick: bool,
    },
}

/// The workspace root (xtask's parent directory).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Sets the machine up, then builds `targets` of proxy-userspace in release mode.
fn release_build(targets: &[&str]) -> anyhow::Result<()> {
    setup::run_all(&root())?;
    let build = ["build", "--release", "-p", "proxy-userspace"];
    cargo(&[build.as_slice(), targets].concat())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// Runs the test suite, streaming cargo's output, and closes with the totals of every test
/// binary (cargo's own last line is that of the last binary, often a doc-test run of 0).
/// The Kubernetes tests get a real API server and are required to run.
fn test() -> anyhow::Result<()> {
    // Beside this checkout, or where PROXY_K8S_SCRIPTS says (a clone elsewhere).
    let scripts = std::env::var_os("PROXY_K8S_SCRIPTS").map_or_else(
        || root().join("../shared/k8s-apiserver"),
        std::path::PathBuf::from,
    );
    let apiserver = apiserver::ApiServer::start(&scripts, &root().join("target/k8s-apiserver"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let args = ["test", "--workspace", "--exclude", "proxy-ebpf"];
    println!("xtask: cargo {}", args.join(" "));
    let mut child = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .env("KUBECONFIG", &apiserver.kubeconfig)
        .env("K8S_HOME", &apiserver.home)
        .env("PROXY_K8S_TESTS", "required")
        .env("PROXY_K8S_SCRIPTS", &scripts)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                summary.split(';').find_map(|part| {
                    part.trim()
                        .trim_start_matches("ok. ")
                        .trim_start_matches("FAILED. ")
                        .strip_suffix(word)?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            };
            passed += count("passed").unwrap_or(0);
            failed += count("failed").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    let (chart_passed, chart_failed) = chart_tests()?;
    // The image of the binaries `cargo test` built, run.
    let (image_passed, image_failed) = image_tests(&root().join("target/debug"))
        .inspect_err(|e| println!("FAIL image: {e:#}"))
        .unwrap_or((0, 1));
    // `cargo test` built the examples: the quick benchmark checks that the bench still works.
    let bench_ok = bench(
        "debug",
        &[QUICK_BENCH.as_slice(), &["--out", "target/bench-quick"]].concat(),
    )
    .inspect_err(|e| println!("bench --quick failed: {e:#}"))
    .is_ok();
    let total_passed = passed + chart_passed + image_passed + u64::from(bench_ok);
    let total_failed = failed + chart_failed + image_failed + u64::from(!bench_ok);
    println!("tests: {total_passed} passed, {total_failed} failed");
    ensure!(
        status.success() && failed == 0,
        "the test suite failed ({status})"
    );
    ensure!(
        chart_failed == 0 && image_failed == 0 && bench_ok,
        "the chart tests, the image checks or the quick benchmark failed"
    );
    Ok(())
}

/// Arguments of the quick benchmark run, which `cargo xtask test` also makes.
const QUICK_BENCH: [&str; 10] = [
    "--sizes",
    "10",
    "--runs",
    "10000",
    "--duration-ms",
    "300",
    "--change-sizes",
    "100",
    "--change-flows",
    "10000",
];

/// Runs the benchmark built in `profile` (`debug` or `release`) with `args`.
fn bench(profile: &str, args: &[&str]) -> anyhow::Result<()> {
    let bench = root().join("target").join(profile).join("examples/bench");
    println!("xtask: {} {}", bench.display(), args.join(" "));
    let status = Command::new(&bench)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {}", bench.display()))?;
    ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}

/// Puts the results of the last full benchmark run into the README, between its markers,
/// so that no figure there is typed by hand.
fn quote_results(dir: &str) -> anyhow::Result<()> {
    const BEGIN: &str = "<!-- bench results: generated by cargo xtask bench -->";
    const END: &str = "<!-- end of bench results -->";
    let results = std::fs::read_to_string(root().join(dir).join("results.md"))
        .context("reading the bench results")?;
    let results = results.replace("](", &format!("]({dir}/"));
    let readme_path = root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).context("reading README.md")?;
    let (start, end) = (readme.find(BEGIN), readme.find(END));
    let (Some(start), Some(end)) = (start, end) else {
        anyhow::bail!("README.md lacks the bench result markers")
    };
    let updated = format!("{}{BEGIN}\n{results}{}", &readme[..start], &readme[end..]);
    std::fs::write(&readme_path, updated).context("writing README.md")?;
    println!("xtask: quoted {dir}/results.md in README.md");
    Ok(())
}

/// Builds the image from the binaries in `bin_dir` and checks it; (passed, failed).
fn image_tests(bin_dir: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    const TAG: &str = "localhost/ebpf-proxy:test";
    image::build(bin_dir, &root().join("target/image-test"), TAG)?;
    let checked = image::check(TAG, &root().join("proxy-userspace/manifests/demo.yaml"));
    // The image is a few hundred MiB: kept only as long as it is checked.
    let _ = Command::new("podman")
        .args(["rmi", "--force", TAG])
        .output();
    let _ = std::fs::remove_dir_all(root().join("target/image-test"));
    checked
}

/// Runs the Helm chart's tests; returns (passed, failed) from their closing line.
fn chart_tests() -> anyhow::Result<(u64, u64)> {
    let python = setup::chart_venv(&root()).join("bin/python");
    let script = root().join("helm/tests/test_chart.py");
    println!("xtask: {} {}", python.display(), script.display());
    let out = Command::new(&python)
        .arg(&script)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary = text
        .lines()
        .find_map(|l| l.strip_prefix("chart: "))
        .context("the chart tests printed no summary")?;
    let count = |word: &str| {
        summary
            .split(", ")
            .find_map(|p| p.strip_suffix(word)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((count(" passed"), count(" failed")))
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Setup { build_only: true } => setup::build_tools(),
        Task::Setup { build_only: false } => setup::run_all(&root()),
        Task::Test => {
            setup::run_all(&root())?;
            test()
        }
        Task::Bench { quick } => {
            release_build(&["--bins", "--examples"])?;
            // A full run's results are committed and quoted by the README.
            let out = if quick {
                "target/bench-quick"
            } else {
                "xtask/bench-results"
            };
            let args: Vec<&str> = if quick { QUICK_BENCH.to_vec() } else { vec![] };
            bench("release", &[args.as_slice(), &["--out", out]].concat())?;
            if !quick {
                quote_results(out)?;
            }
            Ok(())
        }
        Task::Image { tag } => {
            release_build(&["--bin", "proxy-agent", "--bin", "proxyctl"])?;
            image::build(
                &root().join("target/release"),
                &root().join("target/image"),
                &tag,
            )?;
            let (_, failed) =
                image::check(&tag, &root().join("proxy-userspace/manifests/demo.yaml"))?;
            ensure!(failed == 0, "the image checks failed");
            println!("image: {tag} (push it with `podman push {tag} REGISTRY/NAME:TAG`)");
            Ok(())
        }
        Task::Demo => {
            setup::run_all(&root())?;
            cargo(&["build", "-p", "proxy-userspace", "--bins", "--examples"])?;
            let demo = root().join("target/debug/examples/demo");
            let status = Command::new(&demo)
                .status()
                .with_context(|| format!("running {}", demo.display()))?;
            ensure!(status.success(), "the demo failed ({status})");
            Ok(())
        }
    }
}
