//! Why an input object (or part of one) was not served: which object, which field, why.
use std::fmt;

/// A short, stable reason, used as the `reason` label of the rejected-objects metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The document is not valid YAML or does not match the object's schema.
    Parse,
    /// A field the object's schema does not have (a typo such as `targetport`): ignored.
    UnknownField,
    /// A kind/apiVersion this proxy does not read.
    UnsupportedKind,
    MissingField,
    InvalidAddress,
    InvalidPort,
    UnsupportedProtocol,
    InvalidAffinity,
    InvalidPolicy,
    InvalidType,
    /// An address family the datapath does not serve yet (IPv6).
    UnsupportedFamily,
    /// Another service port already uses the same address, port and protocol.
    Conflict,
    /// A map is full: its entries or the ids that index it are used up.
    MapFull,
    /// The kernel refused a map update (a missing capability).
    MapPermission,
    /// A map refused an update for another reason.
    MapUpdate,
    /// A healthCheckNodePort could not be served (e.g. the port is in use).
    HealthCheckPort,
}

impl Reason {
    /// Every reason, so that each series exists (at 0) before its first rejection.
    pub const ALL: [Reason; 16] = [
        Reason::Parse,
        Reason::UnknownField,
        Reason::UnsupportedKind,
        Reason::MissingField,
        Reason::InvalidAddress,
        Reason::InvalidPort,
        Reason::UnsupportedProtocol,
        Reason::InvalidAffinity,
        Reason::InvalidPolicy,
        Reason::InvalidType,
        Reason::UnsupportedFamily,
        Reason::Conflict,
        Reason::MapFull,
        Reason::MapPermission,
        Reason::MapUpdate,
        Reason::HealthCheckPort,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Parse => "parse_error",
            Reason::UnknownField => "unknown_field",
            Reason::UnsupportedKind => "unsupported_kind",
            Reason::MissingField => "missing_field",
            Reason::InvalidAddress => "invalid_address",
            Reason::InvalidPort => "invalid_port",
            Reason::UnsupportedProtocol => "unsupported_protocol",
            Reason::InvalidAffinity => "invalid_session_affinity",
            Reason::InvalidPolicy => "invalid_traffic_policy",
            Reason::InvalidType => "invalid_service_type",
            Reason::UnsupportedFamily => "unsupported_ip_family",
            Reason::Conflict => "conflict",
            Reason::MapFull => "map_full",
            Reason::MapPermission => "map_permission_denied",
            Reason::MapUpdate => "map_update_failed",
            Reason::HealthCheckPort => "health_check_port_unavailable",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// e.g. `Service default/web`, `EndpointSlice default/web-abc`, `manifest /etc/x.yaml`.
    pub object: String,
    /// e.g. `spec.ports[1].protocol`.
    pub field: String,
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(
        object: &str,
        field: impl Into<String>,
        reason: Reason,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            object: object.to_owned(),
            field: field.into(),
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.detail)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.detail)
        }
    }
}
