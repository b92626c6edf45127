//! Which interfaces get the tc programs: `--interfaces` names them, matches them with
//! patterns (the host side of pod veths: `lxc*`, `cali*`, `veth*`) or says `auto` (the
//! node's external interface: those of the default routes and the one holding the node
//! IP). Patterns and `auto` are resolved again while the agent runs, so that a new pod's
//! veth gets the programs and a deleted one is let go.

use anyhow::bail;

use crate::{
    link_target,
    node::{NodeIps, interface_addrs},
};

/// One entry of `--interfaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// This interface, which must exist.
    Name(String),
    /// Every interface whose name matches (`*` any run of characters, `?` one character).
    Pattern(String),
    /// The interfaces of the default routes and the one holding the node IP.
    Auto,
}

impl Spec {
    pub fn parse(entries: &[String]) -> Vec<Spec> {
        entries
            .iter()
            .map(|e| match e.as_str() {
                "auto" => Spec::Auto,
                e if e.contains(['*', '?']) => Spec::Pattern(e.to_owned()),
                e => Spec::Name(e.to_owned()),
            })
            .collect()
    }
}

/// Whether `name` matches `pattern` (`*`, `?`).
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            matches(rest, name) || (!name.is_empty() && matches(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, name))) => matches(rest, name),
        (Some((p, rest)), Some((n, name))) if p == n => matches(rest, name),
        _ => false,
    }
}

/// The interfaces `specs` select among `present`, in the order of `specs` then of
/// `present`, each once; `external` are the interfaces `Auto` stands for.
pub fn resolve(specs: &[Spec], present: &[String], external: &[String]) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    let mut add = |name: &String| {
        if !chosen.contains(name) {
            chosen.push(name.clone());
        }
    };
    for spec in specs {
        match spec {
            Spec::Name(name) => add(name),
            Spec::Pattern(pattern) => present
                .iter()
                .filter(|p| matches(pattern.as_bytes(), p.as_bytes()))
                .for_each(&mut add),
            Spec::Auto => external.iter().for_each(&mut add),
        }
    }
    chosen
}

/// The interfaces of this network namespace's IPv4 default routes (`/proc/net/route`).
fn default_route_interfaces() -> Vec<String> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Destination and mask 0: a default route.
            (fields.get(1) == Some(&"00000000") && fields.get(7) == Some(&"00000000"))
                .then(|| fields[0].to_owned())
        })
        .collect()
}

/// Resolves `--interfaces` on this node now.
pub struct Interfaces {
    specs: Vec<Spec>,
    node_ips: NodeIps,
}

impl Interfaces {
    pub fn new(entries: &[String], node_ips: NodeIps) -> Self {
        Self {
            specs: Spec::parse(entries),
            node_ips,
        }
    }

    /// Whether the set can change while the agent runs.
    pub fn followed(&self) -> bool {
        self.specs.iter().any(|s| !matches!(s, Spec::Name(_)))
    }

    /// The interfaces selected now. Fails when a named one is missing or `auto` finds no
    /// external interface: both are configuration mistakes, said with the fix.
    pub fn resolve(&self) -> anyhow::Result<Vec<String>> {
        let present = link_target::interfaces();
        let names: Vec<String> = self
            .specs
            .iter()
            .filter_map(|s| match s {
                Spec::Name(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        crate::preflight::interfaces(&names, "--interfaces")?;
        let mut external = default_route_interfaces();
        if self.specs.contains(&Spec::Auto) {
            let holding = interface_addrs(&present)?
                .into_iter()
                .filter(|(_, a)| self.node_ips.iter().any(|ip| ip == *a))
                .map(|(name, _)| name);
            external.extend(holding);
            if external.is_empty() {
                bail!(
                    "--interfaces auto: no default route and no interface holding --node-ip \
                     {} in this network namespace; name the external interface instead",
                    self.node_ips
                );
            }
        }
        Ok(resolve(&self.specs, &present, &external))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_patterns_and_auto_resolve_in_order_each_once() {
        let specs = Spec::parse(&names(&["auto", "lxc*", "cali?", "eth0"]));
        assert_eq!(
            specs,
            [
                Spec::Auto,
                Spec::Pattern("lxc*".into()),
                Spec::Pattern("cali?".into()),
                Spec::Name("eth0".into())
            ]
        );
        let present = names(&[
            "lo",
            "eth0",
            "lxc12ab",
            "lxc_health",
            "cali1",
            "cali12",
            "vxlan",
        ]);
        assert_eq!(
            resolve(&specs, &present, &names(&["eth0"])),
            ["eth0", "lxc12ab", "lxc_health", "cali1"]
        );
    }

    #[test]
    fn patterns() {
        for (pattern, name, expected) in [
            ("veth*", "veth0a1b", true),
            ("veth*", "vet", false),
            ("*", "", true),
            ("v*h*", "vethh", true),
            ("cali?", "cali", false),
            ("eth0", "eth0", true),
        ] {
            assert_eq!(
                matches(pattern.as_bytes(), name.as_bytes()),
                expected,
                "{pattern} {name}"
            );
        }
    }
}
