//! Cleaning up on uninstall without a hook: a DaemonSet's pods are stopped both when it is
//! updated (the datapath must stay, so that the next agent takes over without dropping a
//! connection) and when it is deleted (`helm uninstall`: nothing of ours must stay behind).
//! At SIGTERM the agent tells them apart by asking the API server whether its DaemonSet is
//! gone or being deleted; when unsure (the API server unreachable) it keeps the datapath.
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{Api, Client};
use tracing::warn;

/// `NAMESPACE/NAME` of the DaemonSet the agent runs in.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for Owner {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => Ok(Owner {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `owner` is gone or being deleted, i.e. the agent is being uninstalled.
pub async fn uninstalling(client: &Client, owner: &Owner) -> bool {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &owner.namespace);
    match tokio::time::timeout(ASK_TIMEOUT, api.get_opt(&owner.name)).await {
        Ok(Ok(None)) => true,
        Ok(Ok(Some(daemon_set))) => daemon_set.metadata.deletion_timestamp.is_some(),
        Ok(Err(e)) => {
            warn!("asking whether DaemonSet {owner} is being deleted: {e}; keeping the datapath");
            false
        }
        Err(_) => {
            warn!(
                "asking whether DaemonSet {owner} is being deleted: no answer in {ASK_TIMEOUT:?}; \
                 keeping the datapath"
            );
            false
        }
    }
}
