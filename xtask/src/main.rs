//! Project tasks: `cargo xtask setup | test | demo`. `test` and `demo` run `setup` first,
//! which installs what is missing on a fresh machine and skips what is there.
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
    /// Install what the project needs (apt packages, nightly rust-src, bpf-linker, bpffs).
    Setup,
    /// Set up, then run the whole test suite (unit and namespace integration tests; root).
    Test,
    /// Set up, then run the demo: a namespace world with ClusterIP traffic through the agent.
    Demo,
}

/// The workspace root (xtask's parent directory).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo).args(args).current_dir(root()).status().with_context(|| format!("running {cargo}"))?;
    ensure!(status.success(), "cargo {} failed ({status})", args.join(" "));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Args::parse().task {
        Task::Setup => setup::run_all(),
        Task::Test => {
            setup::run_all()?;
            cargo(&["test", "--workspace", "--exclude", "proxy-ebpf"])
        }
        Task::Demo => {
            setup::run_all()?;
            cargo(&["build", "-p", "proxy-userspace", "--bins", "--examples"])?;
            let demo = root().join("target/debug/examples/demo");
            let status = Command::new(&demo).status().with_context(|| format!("running {}", demo.display()))?;
            ensure!(status.success(), "the demo failed ({status})");
            Ok(())
        }
    }
}
