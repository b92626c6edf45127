//! The standalone source: Kubernetes YAML manifests (a file, a multi-document file or a
//! directory of them), re-read when they change. A file that cannot be parsed keeps serving
//! the objects it last held; a bad object inside a good file is rejected on its own.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Deserialize as _;

use crate::{
    rejection::{Reason, Rejection},
    store::{Kind, Name, Object},
};

/// One thing that changed in the manifests since they were last read (everything, the
/// first time).
#[derive(Debug)]
pub enum Change {
    /// An object added or changed.
    Applied(Object),
    Deleted(Kind, Name),
    Rejected(Rejection),
}

type ObjectId = (Kind, Name);

/// What a manifest file held when it was last parsed: its text's fingerprint and each
/// object's.
#[derive(Debug, Default)]
struct FileState {
    text: u64,
    objects: HashMap<ObjectId, u64>,
}

/// Reads manifests incrementally: a file whose text did not change is not parsed again, and
/// of a file that did, only the objects that changed are passed on. Only fingerprints are
/// kept here; the store holds the objects.
pub struct ManifestSource {
    path: PathBuf,
    files: HashMap<PathBuf, FileState>,
    /// The file that defines each object: a second definition elsewhere is rejected.
    owners: HashMap<ObjectId, PathBuf>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn fingerprint(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

impl ManifestSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        // Absolute, to compare with the paths of watch events.
        let path = std::path::absolute(&path).unwrap_or(path);
        Self {
            path,
            files: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn list(&self) -> std::io::Result<Vec<PathBuf>> {
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

    /// Reads what changed and passes each change to `emit` as it is found, so that no more
    /// than one object is held here at a time. Files that vanished from a directory take
    /// their objects with them; a file that cannot be read or parsed keeps its last good
    /// objects.
    pub fn read_changes(&mut self, emit: &mut impl FnMut(Change)) {
        let files = match self.list() {
            Ok(files) => files,
            Err(e) => {
                emit(Change::Rejected(Rejection::new(
                    &format!("manifest {}", self.path.display()),
                    "",
                    Reason::Parse,
                    format!("cannot list: {e}; still serving the last valid objects"),
                )));
                return;
            }
        };
        let vanished: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !files.contains(f))
            .cloned()
            .collect();
        for file in vanished {
            let old = self.files.remove(&file).unwrap_or_default();
            self.forget_missing(old, &HashMap::new(), emit);
        }
        for file in files {
            let origin = format!("manifest {}", file.display());
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(e) => {
                    let detail = format!("cannot read: {e}");
                    emit(Change::Rejected(Rejection::new(
                        &origin,
                        "",
                        Reason::Parse,
                        detail,
                    )));
                    continue;
                }
            };
            let text_fingerprint = fingerprint(&text);
            if self.files.get(&file).map(|f| f.text) == Some(text_fingerprint) {
                continue;
            }
            let old = self.files.remove(&file).unwrap_or_default();
            let mut objects = HashMap::new();
            let owners = &mut self.owners;
            let parsed = parse_manifest(&text, &origin, |(object, print)| {
                admit(owners, &file, &old, &mut objects, object, print, emit);
            });
            let state = match parsed {
                Ok(rejections) => {
                    for rejection in rejections {
                        emit(Change::Rejected(rejection));
                    }
                    self.forget_missing(old, &objects, emit);
                    FileState {
                        text: text_fingerprint,
                        objects,
                    }
                }
                Err(mut rejection) => {
                    if !old.objects.is_empty() {
                        rejection
                            .detail
                            .push_str("; still serving the objects it last held");
                    }
                    emit(Change::Rejected(rejection));
                    // The documents before the error are taken; the file is parsed again
                    // at its next change.
                    let mut kept = old;
                    kept.objects.extend(objects);
                    kept
                }
            };
            self.files.insert(file, state);
        }
    }

    /// Deletes the objects `old` held that its file no longer holds (`now`).
    fn forget_missing(
        &mut self,
        old: FileState,
        now: &HashMap<ObjectId, u64>,
        emit: &mut impl FnMut(Change),
    ) {
        for id in old.objects.into_keys() {
            if !now.contains_key(&id) {
                self.owners.remove(&id);
                emit(Change::Deleted(id.0, id.1));
            }
        }
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

/// Takes one object that `file` holds now (`print`: its document's fingerprint) into `now`,
/// passing it on if it is new or changed; rejects a second definition of an object that
/// another file holds.
fn admit(
    owners: &mut HashMap<ObjectId, PathBuf>,
    file: &Path,
    old: &FileState,
    now: &mut HashMap<ObjectId, u64>,
    object: Object,
    print: u64,
    emit: &mut impl FnMut(Change),
) {
    let id = (object.kind(), object.name());
    if let Some(owner) = owners.get(&id).filter(|owner| *owner != file) {
        emit(Change::Rejected(Rejection::new(
            &format!(
                "{:?} {}/{} in manifest {}",
                id.0,
                id.1.0,
                id.1.1,
                file.display()
            ),
            "metadata.name",
            Reason::Conflict,
            format!(
                "already defined in {}; this definition is ignored",
                owner.display()
            ),
        )));
        return;
    }
    owners.insert(id.clone(), file.to_path_buf());
    if old.objects.get(&id) != Some(&print) {
        emit(Change::Applied(object));
    }
    now.insert(id, print);
}

/// An object and the fingerprint of its document, to tell whether it changed.
pub type Parsed = (Object, u64);

/// Parses a (multi-document) manifest, passing each object to `take` as soon as it is
/// parsed. `Err` at the first document that is not YAML at all; otherwise a rejection for
/// each document that did not make an object.
pub fn parse_manifest(
    text: &str,
    origin: &str,
    mut take: impl FnMut(Parsed),
) -> Result<Vec<Rejection>, Rejection> {
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
            Ok(objects) => objects.into_iter().for_each(&mut take),
            Err(rejection) => rejections.push(rejection),
        }
    }
    Ok(rejections)
}

fn object_from_value(value: serde_yaml::Value, origin: &str) -> Result<Vec<Parsed>, Rejection> {
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
    let print = fingerprint(&value);
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Ok(vec![(
            Object::Service(Box::new(typed(value, &object)?)),
            print,
        )]),
        ("discovery.k8s.io/v1", "EndpointSlice") => Ok(vec![(
            Object::EndpointSlice(Box::new(typed(value, &object)?)),
            print,
        )]),
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
        let mut objects = Vec::new();
        let rejections = parse_manifest(text, "manifest m.yaml", |p| objects.push(p)).unwrap();
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
        let err = parse_manifest("apiVersion: v1\nkind: [Service\n", "manifest m.yaml", drop)
            .unwrap_err();
        assert_eq!(err.reason, Reason::Parse);
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn list_items_are_read() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}}\n";
        let mut objects = Vec::new();
        parse_manifest(text, "m", |p| objects.push(p)).unwrap();
        assert_eq!(objects.len(), 1);
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 1}}]}}\n"
        )
    }

    /// What one read found: names applied, ids deleted, rejections.
    #[derive(Default)]
    struct Read {
        applied: Vec<String>,
        deleted: Vec<ObjectId>,
        rejections: Vec<Rejection>,
    }

    fn read(source: &mut ManifestSource) -> Read {
        let mut read = Read::default();
        source.read_changes(&mut |change| match change {
            Change::Applied(o) => read.applied.push(o.name().1),
            Change::Deleted(kind, name) => read.deleted.push((kind, name)),
            Change::Rejected(r) => read.rejections.push(r),
        });
        read
    }

    #[test]
    fn only_what_changed_is_passed_on() {
        let dir = std::env::temp_dir().join(format!("proxy-manifest-diff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        std::fs::write(
            &a,
            service("x", "10.96.0.1") + "---\n" + &service("y", "10.96.0.2"),
        )
        .unwrap();
        std::fs::write(&b, service("z", "10.96.0.3")).unwrap();
        let mut source = ManifestSource::new(&dir);
        assert_eq!(read(&mut source).applied, ["x", "y", "z"]);
        assert!(read(&mut source).applied.is_empty(), "nothing changed");
        // One object of a file edited, another removed: b is not even parsed.
        std::fs::write(&a, service("x", "10.96.0.9")).unwrap();
        let changes = read(&mut source);
        assert_eq!(changes.applied, ["x"]);
        assert_eq!(
            changes.deleted,
            [(Kind::Service, ("default".into(), "y".into()))]
        );
        // A second definition elsewhere is rejected, not served.
        std::fs::write(
            &b,
            service("z", "10.96.0.3") + "---\n" + &service("x", "10.96.0.7"),
        )
        .unwrap();
        let changes = read(&mut source);
        assert!(changes.applied.is_empty(), "{:?}", changes.applied);
        assert!(
            changes.rejections[0]
                .to_string()
                .contains("already defined in"),
            "{}",
            changes.rejections[0]
        );
        std::fs::remove_file(&a).unwrap();
        let changes = read(&mut source);
        assert_eq!(
            changes.deleted,
            [(Kind::Service, ("default".into(), "x".into()))]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unparsable_file_keeps_its_last_objects() {
        let dir = std::env::temp_dir().join(format!("proxy-manifest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("svc.yaml");
        std::fs::write(&file, service("a", "10.96.0.1")).unwrap();
        let mut source = ManifestSource::new(&dir);
        assert_eq!(read(&mut source).applied.len(), 1);
        std::fs::write(&file, "kind: [oops\n").unwrap();
        let changes = read(&mut source);
        assert!(
            changes.applied.is_empty() && changes.deleted.is_empty(),
            "last good objects of the file are kept"
        );
        assert!(changes.rejections[0].to_string().contains("still serving"));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            read(&mut source).deleted.len(),
            1,
            "a deleted file takes its objects with it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
