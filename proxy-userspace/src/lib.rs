//! The userspace side of the eBPF service proxy: input sources, validation, translation to
//! map entries, the reconciler that programs the pinned maps, and the tools around them.
pub mod desired;
pub mod manifest;
pub mod model;
pub mod rejection;
pub mod store;
pub mod maps;
pub mod reconcile;
pub mod agent;
pub mod conntrack;
pub mod datapath;
pub mod http;
pub mod metrics;
pub mod testbed;
