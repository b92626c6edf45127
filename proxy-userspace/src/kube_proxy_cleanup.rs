//! `proxy-agent --cleanup-kube-proxy`: removes what kube-proxy leaves on a node once it is
//! gone, as its own `--cleanup` does: in iptables mode (IPv4 and IPv6, legacy and nft
//! back-ends) its chains in the nat, filter and mangle tables and every rule that jumps to
//! them; in nftables mode its `kube-proxy` tables. The kernel's conntrack entries are kept:
//! they carry on translating the connections kube-proxy's rules set up until those end —
//! provided the kernel keeps tracking connections in the network namespace, which it stops
//! doing once no rule uses conntrack any more (kube-proxy's NAT rules may have been the last
//! ones). So before removing anything, a one-rule table of ours keeps it on
//! (`CONNTRACK_KEEPER`); `proxy-agent --cleanup` removes it.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Chains kube-proxy creates (iptables and IPVS modes), by name and by prefix. kubelet's
/// (`KUBE-KUBELET-CANARY`, `KUBE-FIREWALL`, `KUBE-MARK-DROP`) are not among them.
const CHAINS: [&str; 14] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-MARK-MASQ",
    "KUBE-PROXY-CANARY",
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-FIREWALL-IPVS",
];
const CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];
const TABLES: [&str; 3] = ["nat", "filter", "mangle"];
/// The nftables table that keeps connection tracking on: a counter of established flows.
pub const CONNTRACK_KEEPER: &str = "ebpf-proxy-conntrack";
/// The iptables front-ends to clean, each with its save and restore commands: both
/// back-ends where both exist (kube-proxy uses the one the node's iptables uses), and the
/// plain names where only those exist. A back-end cleaned twice finds nothing the second time.
const IPTABLES: [(&str, &str); 6] = [
    ("iptables-save", "iptables-restore"),
    ("ip6tables-save", "ip6tables-restore"),
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

fn is_kube_proxy_chain(chain: &str) -> bool {
    CHAINS.contains(&chain) || CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// The target of an `-A CHAIN ... -j TARGET` (or `-g`) rule line.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            return words.next();
        }
    }
    None
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains from one table,
/// given `iptables-save -t TABLE` output, and how many chains it removes. `None` if there
/// are none. Each chain is flushed (a chain line does that), the rules of other chains that
/// jump to one are deleted, then the chains are.
pub fn restore_script(table: &str, saved: &str) -> Option<(String, usize)> {
    let chains: Vec<&str> = saved
        .lines()
        .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
        .filter(|c| is_kube_proxy_chain(c))
        .collect();
    if chains.is_empty() {
        return None;
    }
    let mut script = format!("*{table}\n");
    for chain in &chains {
        script += &format!(":{chain} - [0:0]\n");
    }
    for rule in saved.lines().filter_map(|l| l.strip_prefix("-A ")) {
        let owner = rule.split_whitespace().next().unwrap_or_default();
        if !is_kube_proxy_chain(owner) && jump_target(rule).is_some_and(is_kube_proxy_chain) {
            script += &format!("-D {rule}\n");
        }
    }
    for chain in &chains {
        script += &format!("-X {chain}\n");
    }
    script += "COMMIT\n";
    Some((script, chains.len()))
}

fn exists(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `command` with `input` on its standard input; fails with its error output.
fn feed(command: &mut Command, input: &str) -> anyhow::Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    child
        .stdin
        .take()
        .context("its standard input")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {command:?}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}\ninput was:\n{input}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Keeps the kernel's connection tracking on in this network namespace (idempotent).
fn keep_conntrack() -> anyhow::Result<()> {
    let table = format!("inet {CONNTRACK_KEEPER}");
    let script = format!(
        "table {table} {{}}\ndelete table {table}\ntable {table} {{\n  chain keep {{\n    \
         type filter hook prerouting priority raw; policy accept;\n    \
         ct state established,related counter comment \"keeps connection tracking on for \
         connections kube-proxy translated\"\n  }}\n}}\n"
    );
    feed(Command::new("nft").args(["-f", "-"]), &script)
        .context("keeping connection tracking on (nft)")
}

/// Whether `nft list tables` output `tables` has the table `name` of `family`.
fn nft_has_table(tables: &str, family: &str, name: &str) -> bool {
    tables
        .lines()
        .any(|l| l.trim() == format!("table {family} {name}"))
}

fn nft_list_tables() -> anyhow::Result<Option<String>> {
    if !exists("nft") {
        return Ok(None);
    }
    output(Command::new("nft").args(["list", "tables"])).map(Some)
}

/// Removes the table of `keep_conntrack`, if there is one.
pub fn remove_conntrack_keeper() -> anyhow::Result<bool> {
    let Some(tables) = nft_list_tables()? else {
        return Ok(false);
    };
    if !nft_has_table(&tables, "inet", CONNTRACK_KEEPER) {
        return Ok(false);
    }
    output(Command::new("nft").args(["delete", "table", "inet", CONNTRACK_KEEPER]))?;
    Ok(true)
}

/// For each of the tables, the script that removes kube-proxy's chains from what `save`
/// shows now, and what it removes.
fn scripts(save: &str) -> Vec<(String, String)> {
    TABLES
        .iter()
        .filter_map(|table| {
            // A table the kernel or back-end lacks (e.g. no ip6 mangle) has nothing of ours.
            let saved = output(Command::new(save).args(["-t", table])).ok()?;
            let (script, chains) = restore_script(table, &saved)?;
            Some((script, format!("{chains} chains from {save} -t {table}")))
        })
        .collect()
}

/// The families (`ip`, `ip6`, `inet`) that have a `kube-proxy` nftables table.
fn nft_tables() -> anyhow::Result<Vec<&'static str>> {
    let tables = nft_list_tables()?.unwrap_or_default();
    Ok(["ip", "ip6", "inet"]
        .into_iter()
        .filter(|family| nft_has_table(&tables, family, "kube-proxy"))
        .collect())
}

/// Removes kube-proxy's iptables chains and nftables tables; returns one line per thing
/// removed.
pub fn run() -> anyhow::Result<Vec<String>> {
    let tools: Vec<(&str, &str)> = IPTABLES
        .into_iter()
        .filter(|(save, _)| exists(save))
        .collect();
    if tools.is_empty() && !exists("nft") {
        bail!("neither iptables nor nft found in PATH: nothing could be checked");
    }
    let nft_tables = nft_tables()?;
    let mut removed = Vec::new();
    if nft_tables.is_empty() && tools.iter().all(|(save, _)| scripts(save).is_empty()) {
        return Ok(removed);
    }
    if exists("nft") {
        keep_conntrack()?;
    } else {
        tracing::warn!(
            "nft not found: connection tracking may stop in this network namespace with \
             kube-proxy's rules, and the connections they translated with it"
        );
    }
    // Saved again just before each restore: one back-end may show up under two names, and
    // the second then finds nothing left.
    for (save, restore_command) in tools {
        for (script, what) in scripts(save) {
            feed(Command::new(restore_command).arg("--noflush"), &script)?;
            removed.push(what);
        }
    }
    for family in nft_tables {
        output(Command::new("nft").args(["delete", "table", family, "kube-proxy"]))?;
        removed.push(format!("nftables table {family} kube-proxy"));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_kube_proxy_chains_and_the_jumps_to_them_and_nothing_else() {
        let saved = "*nat\n\
            :PREROUTING ACCEPT [0:0]\n\
            :POSTROUTING ACCEPT [0:0]\n\
            :KUBE-SERVICES - [0:0]\n\
            :KUBE-POSTROUTING - [0:0]\n\
            :KUBE-SVC-ABC - [0:0]\n\
            :KUBE-SEP-DEF - [0:0]\n\
            :KUBE-KUBELET-CANARY - [0:0]\n\
            :CNI-HOSTPORT - [0:0]\n\
            -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
            -A PREROUTING -j CNI-HOSTPORT\n\
            -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
            -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-ABC\n\
            -A KUBE-SVC-ABC -j KUBE-SEP-DEF\n\
            -A KUBE-SEP-DEF -p tcp -j DNAT --to-destination 10.244.1.2:6443\n\
            COMMIT\n";
        let (script, chains) = restore_script("nat", saved).unwrap();
        assert_eq!(chains, 4);
        assert_eq!(
            script,
            "*nat\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-POSTROUTING - [0:0]\n\
             :KUBE-SVC-ABC - [0:0]\n\
             :KUBE-SEP-DEF - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -X KUBE-SERVICES\n\
             -X KUBE-POSTROUTING\n\
             -X KUBE-SVC-ABC\n\
             -X KUBE-SEP-DEF\n\
             COMMIT\n"
        );
        assert!(restore_script("filter", "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n").is_none());
    }
}
