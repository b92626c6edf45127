//! `proxy-agent --cleanup`: removes everything an agent created on this node — the pinned
//! links (which detaches the socket hooks, TCX and XDP programs), the tc programs attached as
//! netlink filters (on every interface of this network namespace), the pinned maps and the pin
//! directory, and the table that `--cleanup-kube-proxy` left to keep connection tracking on
//! — as kube-proxy's `--cleanup` removes its rules. It refuses while an agent holds the
//! directory. clsact qdiscs are left: other programs may use them.
use std::path::Path;

use anyhow::Context as _;
use aya::programs::tc;
use proxy_common::maps;

use crate::{
    datapath::TC_PROGRAMS,
    kube_proxy_cleanup::{self, CONNTRACK_KEEPER},
    link_target,
    node_lock::{LockError, NodeLock},
};

/// What `--cleanup` removed.
#[derive(Debug, Default, PartialEq)]
pub struct Removed {
    pub links: Vec<String>,
    pub filters: Vec<String>,
    pub maps: usize,
    pub directory: bool,
    pub conntrack_keeper: bool,
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "detached {} pinned links, {} netlink tc filters; removed {} pinned maps{}{}",
            self.links.len(),
            self.filters.len(),
            self.maps,
            if self.directory {
                " and the pin directory"
            } else {
                ""
            },
            if self.conntrack_keeper {
                format!(" and the nftables table inet {CONNTRACK_KEEPER}")
            } else {
                String::new()
            }
        )
    }
}

pub fn agent_datapath(bpffs: &Path) -> anyhow::Result<Removed> {
    // Netlink filters are not pinned: they are found by program name on every interface.
    let mut removed = Removed {
        filters: netlink_filters(),
        conntrack_keeper: kube_proxy_cleanup::remove_conntrack_keeper()?,
        ..Removed::default()
    };
    if !bpffs.exists() {
        return Ok(removed);
    }
    let lock = NodeLock::acquire(bpffs).map_err(|e| match e {
        LockError::Held { pid, .. } => anyhow::anyhow!(
            "an agent ({}) is running on {}: stop it first; --cleanup would pull the \
             datapath from under it",
            pid.map_or("pid unknown".to_owned(), |p| format!("pid {p}")),
            bpffs.display()
        ),
        other => other.into(),
    })?;
    let links = bpffs.join("links");
    if links.exists() {
        for entry in
            std::fs::read_dir(&links).with_context(|| format!("listing {}", links.display()))?
        {
            let entry = entry?;
            link_target::detach_and_unpin(&entry.path())
                .with_context(|| format!("removing the pin {}", entry.path().display()))?;
            removed
                .links
                .push(entry.file_name().to_string_lossy().into_owned());
        }
        std::fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    // Earlier agents' conntrack maps, pinned or set aside.
    let earlier = maps::FORMER_CONNTRACK
        .iter()
        .flat_map(|(map, former)| [former.to_string(), crate::ct_upgrade::aside_name(map)]);
    let names = maps::ALL
        .iter()
        .chain(&maps::RETIRED)
        .map(|name| name.to_string());
    for name in names.chain(earlier) {
        let path = bpffs.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the pin {}", path.display()))?;
            removed.maps += 1;
        }
    }
    drop(lock);
    // Only if nothing else lives there: the directory is the agent's, its content may not be.
    removed.directory = std::fs::remove_dir(bpffs).is_ok();
    Ok(removed)
}

/// Removes this datapath's tc filters from every interface; returns "program on iface".
fn netlink_filters() -> Vec<String> {
    let mut removed = Vec::new();
    for iface in link_target::interfaces() {
        for (program, direction) in TC_PROGRAMS {
            // An error is "none there": no clsact qdisc, or no filter of that name.
            if tc::qdisc_detach_program(&iface, direction, program).is_ok() {
                removed.push(format!("{program} on {iface} {direction:?}"));
            }
        }
    }
    removed
}
