//! The demo behind `cargo xtask demo`: builds a namespace world (a node, three backend pods
//! and a client pod), runs proxy-agent on the embedded demo manifests, sends requests
//! through the ClusterIPs both ways (socket LB and tc path), and shows `proxyctl`.
use anyhow::Context as _;
use proxy::testbed::{Binaries, World};

const MANIFEST: &str = include_str!("../manifests/demo.yaml");
const CLIENT: usize = 4;

fn step(title: &str) {
    println!("\n== {title}");
}

fn main() -> anyhow::Result<()> {
    // Examples live in target/<profile>/examples, the binaries one level up.
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("locating the target directory")?;
    let mut world = World::new(4, Binaries::in_dir(bin_dir))?;
    step(
        "namespace world: node (tc on vh1..vh4), pods 10.244.1.2-10.244.3.2 serving :8080, client 10.244.4.2",
    );
    for i in 1..=3 {
        world.serve(i, &format!("pod-{i}"))?;
    }
    let agent = world.start_agent(MANIFEST, false)?;
    for line in agent.log_lines() {
        println!(
            "  {}",
            line.split_once(" proxy::")
                .map_or(line.as_str(), |(_, rest)| rest)
        );
    }

    step(
        "socket LB: the client in the hooked cgroup connects to http://10.96.0.10/ (rewritten at connect(), no NAT)",
    );
    print!(
        "{}",
        world.probe_text(
            CLIENT,
            true,
            &["http", "--to", "10.96.0.10:80", "--count", "6"]
        )?
    );
    step(
        "UDP 10.96.0.10:53 from the hooked cgroup: recvfrom() still reports the ClusterIP as the source",
    );
    print!(
        "{}",
        world.probe_text(
            CLIENT,
            true,
            &["udp", "--to", "10.96.0.10:53", "--count", "3"]
        )?
    );
    step("IPv6: the same dual-stack service at its IPv6 cluster IP [fd00:96::10] (socket LB)");
    print!(
        "{}",
        world.probe_text(
            CLIENT,
            true,
            &["http", "--to", "[fd00:96::10]:80", "--count", "4"]
        )?
    );
    step(
        "tc path: a client outside the hooked cgroup; tc DNATs to a backend and reverse-NATs the replies",
    );
    print!(
        "{}",
        world.probe_text(
            CLIENT,
            false,
            &["http", "--to", "10.96.0.10:80", "--count", "4"]
        )?
    );
    step("sessionAffinity: ClientIP on 10.96.0.11: every request lands on the same pod");
    print!(
        "{}",
        world.probe_text(
            CLIENT,
            true,
            &["http", "--to", "10.96.0.11:80", "--count", "4"]
        )?
    );
    step("a service without endpoints (10.96.0.12): refused at once");
    print!(
        "{}",
        world.probe_text(CLIENT, true, &["http", "--to", "10.96.0.12:80"])?
    );
    step("proxyctl service list");
    print!("{}", world.proxyctl(&["service", "list"])?);
    step("cleaning up the namespace world");
    Ok(())
}
