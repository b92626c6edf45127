//! The standalone source: Kubernetes YAML manifests (a file, a multi-document file or a
//! directory of them), re-read when they change. A file that cannot be parsed keeps serving
//! the objects it last held; a bad object inside a good file is rejected on its own.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Deserialize as _;

use crate::{
    rejection::{Reason, Rejection},
    store::Object,
};

/// Objects read from the manifests, and what was wrong with them.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub rejections: Vec<Rejection>,
}

pub struct ManifestSource {
    path: PathBuf,
    last_good: HashMap<PathBuf, Vec<Object>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

impl ManifestSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        // Absolute, to compare with the paths of watch events.
        let path = std::path::absolute(&path).unwrap_or(path);
        Self {
            path,
            last_good: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        if !self.path.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_manifest(p))
            .collect();
        files.sort();
        Ok(files)
    }

    /// Reads every manifest file. Files that vanished from a directory take their objects
    /// with them; a file that cannot be read or parsed keeps its last good objects.
    pub fn load(&mut self) -> Loaded {
        let mut loaded = Loaded::default();
        let origin = format!("manifest {}", self.path.display());
        let files = match self.files() {
            Ok(files) => files,
            Err(e) => {
                loaded.rejections.push(Rejection::new(
                    &origin,
                    "",
                    Reason::Parse,
                    format!("cannot list: {e}; still serving the last valid objects"),
                ));
                loaded.objects = self.last_good.values().flatten().cloned().collect();
                return loaded;
            }
        };
        self.last_good.retain(|path, _| files.contains(path));
        for file in files {
            let origin = format!("manifest {}", file.display());
            let parsed = std::fs::read_to_string(&file)
                .map_err(|e| {
                    Rejection::new(&origin, "", Reason::Parse, format!("cannot read: {e}"))
                })
                .and_then(|text| parse_manifest(&text, &origin));
            match parsed {
                Ok((objects, rejections)) => {
                    loaded.rejections.extend(rejections);
                    self.last_good.insert(file.clone(), objects);
                }
                Err(mut rejection) => {
                    if self.last_good.contains_key(&file) {
                        rejection
                            .detail
                            .push_str("; still serving the objects it last held");
                    }
                    loaded.rejections.push(rejection);
                }
            }
            loaded
                .objects
                .extend(self.last_good.get(&file).into_iter().flatten().cloned());
        }
        loaded
    }

    /// Calls `changed` whenever a manifest changes. Watches the parent of a file (editors
    /// replace files by renaming) but reacts only to events about the file itself.
    pub fn watch(&self, changed: impl Fn() + Send + 'static) -> anyhow::Result<RecommendedWatcher> {
        let is_dir = self.path.is_dir();
        let path = self.path.clone();
        let relevant = move |p: &Path| if is_dir { is_manifest(p) } else { p == path };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access() && e.paths.iter().any(|p| relevant(p))) {
                    changed();
                }
            })
            .context("creating the manifest file watcher")?;
        let watched = if is_dir {
            self.path.as_path()
        } else {
            self.path.parent().unwrap_or(Path::new("."))
        };
        watcher
            .watch(watched, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", watched.display()))?;
        Ok(watcher)
    }
}

/// Parses a (multi-document) manifest. `Err` when the text is not YAML at all; otherwise
/// the objects that parsed and a rejection for each document that did not.
pub fn parse_manifest(
    text: &str,
    origin: &str,
) -> Result<(Vec<Object>, Vec<Rejection>), Rejection> {
    let mut objects = Vec::new();
    let mut rejections = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| {
            Rejection::new(origin, "", Reason::Parse, format!("not valid YAML: {e}"))
        })?;
        if value.is_null() {
            continue;
        }
        let origin = format!("{origin} (document {})", i + 1);
        match object_from_value(value, &origin) {
            Ok(mut objs) => objects.append(&mut objs),
            Err(rejection) => rejections.push(rejection),
        }
    }
    Ok((objects, rejections))
}

fn object_from_value(value: serde_yaml::Value, origin: &str) -> Result<Vec<Object>, Rejection> {
    let text = |key: &str| {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let meta = value.get("metadata");
    let meta_text = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let object = format!(
        "{kind} {}/{} in {origin}",
        meta_text("namespace").unwrap_or_else(|| "default".into()),
        meta_text("name").unwrap_or_default()
    );
    fn typed<T: serde::de::DeserializeOwned>(
        value: serde_yaml::Value,
        object: &str,
    ) -> Result<T, Rejection> {
        serde_path_to_error::deserialize(value).map_err(|e| {
            Rejection::new(
                object,
                e.path().to_string(),
                Reason::Parse,
                e.into_inner().to_string(),
            )
        })
    }
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Ok(vec![Object::Service(Box::new(typed(value, &object)?))]),
        ("discovery.k8s.io/v1", "EndpointSlice") => Ok(vec![Object::EndpointSlice(Box::new(
            typed(value, &object)?,
        ))]),
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            let mut objects = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                objects.extend(object_from_value(item, &format!("{origin} items[{i}]"))?);
            }
            Ok(objects)
        }
        _ => Err(Rejection::new(
            &object,
            "kind",
            Reason::UnsupportedKind,
            format!(
                "{api_version} {kind} is not read (only v1 Service and discovery.k8s.io/v1 EndpointSlice)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_with_one_bad_object() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: eighty}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
---
";
        let (objects, rejections) = parse_manifest(text, "manifest m.yaml").unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(rejections.len(), 2);
        assert_eq!(
            rejections[0].object,
            "Service shop/broken in manifest m.yaml (document 2)"
        );
        assert_eq!(rejections[0].field, "spec.ports[0].port");
        assert_eq!(rejections[1].reason, Reason::UnsupportedKind);
    }

    #[test]
    fn yaml_syntax_error_fails_the_file() {
        let err =
            parse_manifest("apiVersion: v1\nkind: [Service\n", "manifest m.yaml").unwrap_err();
        assert_eq!(err.reason, Reason::Parse);
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn list_items_are_read() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}}\n";
        assert_eq!(parse_manifest(text, "m").unwrap().0.len(), 1);
    }

    #[test]
    fn unparsable_file_keeps_its_last_objects() {
        let dir = std::env::temp_dir().join(format!("proxy-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("svc.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}\n").unwrap();
        let mut source = ManifestSource::new(&dir);
        assert_eq!(source.load().objects.len(), 1);
        std::fs::write(&file, "kind: [oops\n").unwrap();
        let loaded = source.load();
        assert_eq!(
            loaded.objects.len(),
            1,
            "last good objects of the file are kept"
        );
        assert!(loaded.rejections[0].to_string().contains("still serving"));
        std::fs::remove_file(&file).unwrap();
        assert!(
            source.load().objects.is_empty(),
            "a deleted file takes its objects with it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
