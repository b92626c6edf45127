//! The userspace side of the eBPF service proxy: input sources, validation, translation to
//! map entries, the reconciler that programs the pinned maps, and the tools around them.
pub mod affinity_cleanup;
pub mod agent;
pub mod background;
pub mod claims;
pub mod clock;
pub mod conntrack;
pub mod controller;
pub mod datapath;
pub mod desired;
pub mod health_check;
pub mod http;
pub mod inspect;
pub mod kubernetes;
pub mod manifest;
pub mod map_error;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod node;
pub mod reconcile;
pub mod rejection;
pub mod source;
pub mod store;
pub mod sync_queue;
pub mod sync_state;
pub mod testbed;
