//! The standalone source: Kubernetes YAML manifests (a file, a multi-document file or a
//! directory of them), re-read when they change. A file that cannot be parsed keeps serving
//! the objects it last held; a bad object inside a good file is rejected on its own.
use std::{
    collections::HashMap,
    hash::{BuildHasher as _, Hash, Hasher},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Deserialize as _;

use crate::{
    rejection::{Reason, Rejection},
    store::{Kind, Name, Object},
};

mod direct;
mod split;

/// One thing that changed in the manifests since they were last read (everything, the
/// first time).
#[derive(Debug)]
pub enum Change {
    /// An object added or changed.
    Applied(Object),
    Deleted(Kind, Name),
    Rejected(Rejection),
}

pub type ObjectId = (Kind, Name);

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
    // foldhash rather than SipHash: a fingerprint guards no table against crafted keys, and
    // every document of a cold start is hashed once (4% of its CPU time with SipHash).
    foldhash::quality::FixedState::with_seed(0).hash_one(value)
}

/// Feeds what is written to a hasher.
struct HashWriter<H>(H);

impl<H: Hasher> std::io::Write for HashWriter<H> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.write(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fingerprint of a typed object (of what is served: fields this source ignores do not
/// count), the same whichever way its document was read. Its JSON form is hashed as it is
/// written, without being stored.
fn object_fingerprint(object: &Object) -> u64 {
    let mut writer = HashWriter(foldhash::quality::FixedState::with_seed(0).build_hasher());
    let written = match object {
        Object::Service(s) => serde_json::to_writer(&mut writer, s),
        Object::EndpointSlice(s) => serde_json::to_writer(&mut writer, s),
        Object::Node(n) => serde_json::to_writer(&mut writer, n),
    };
    // Writing to a hasher cannot fail, nor can serialising these types.
    debug_assert!(written.is_ok());
    writer.0.finish()
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
                Ok(failures) => {
                    for mut failure in failures {
                        // A document that names an object but does not type-check leaves
                        // that object's last valid version serving.
                        if let Some(id) = failure.keep
                            && let Some(print) = old.objects.get(&id)
                        {
                            objects.insert(id, *print);
                            failure
                                .rejection
                                .detail
                                .push_str("; still serving its last valid version");
                        }
                        emit(Change::Rejected(failure.rejection));
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

/// A document, or a part of one, that was not taken as written.
#[derive(Debug)]
pub struct Failed {
    pub rejection: Rejection,
    /// The object a document names but whose fields do not type-check (`port: eighty`):
    /// its last valid version keeps serving. `None` for a document with no identity and
    /// for a warning (an unknown field, ignored while the rest is served).
    pub keep: Option<ObjectId>,
}

/// Deepest nesting of flow collections (`[`, `{`) that is parsed: serde_yaml refuses more
/// than 128 levels anyway, but only after libyaml spent time quadratic in the depth on it
/// (4 s for 30,000 levels), holding up every other change.
const MAX_FLOW_DEPTH: usize = 128;

/// The line at which flow collections nest deeper than `MAX_FLOW_DEPTH`, in one pass over
/// the text (quoted scalars and comments skipped). A bracket inside a plain scalar counts
/// too: 128 unclosed ones are no Kubernetes object.
fn too_deep(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let (mut quote, mut comment, mut previous) = (None, false, '\n');
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            comment = false;
        }
        match quote {
            _ if comment => {}
            Some('"') if c == '\\' => {
                chars.next();
            }
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '#' if previous.is_whitespace() => comment = true,
                '"' | '\'' if previous.is_whitespace() || ":,[{-".contains(previous) => {
                    quote = Some(c)
                }
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some(line);
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
        previous = c;
    }
    None
}

/// Parses a (multi-document) manifest, passing each object to `take` as soon as it is
/// parsed. `Err` at the first document that is not YAML at all; otherwise what was not
/// taken as written, document by document.
pub fn parse_manifest(
    text: &str,
    origin: &str,
    mut take: impl FnMut(Parsed),
) -> Result<Vec<Failed>, Rejection> {
    if let Some(line) = too_deep(text) {
        return Err(Rejection::new(
            origin,
            "",
            Reason::Parse,
            format!("collections nest deeper than {MAX_FLOW_DEPTH} levels at line {line}"),
        ));
    }
    let runs = split::runs(text, split::RUN_BYTES);
    if runs.len() == 1 {
        return parse_documents(text, 0, origin, &mut take);
    }
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parse = |run: &split::Run<'_>, take: &mut dyn FnMut(Parsed)| {
        parse_documents(run.text, run.first_document, origin, take)
    };
    split::parse_in_parallel(&runs, workers, &parse, &mut take).map_err(|_| {
        // Parsed again as one stream for the message (lines counted from the file's start);
        // the objects before the error were taken already.
        parse_documents(text, 0, origin, &mut |_| {})
            .err()
            .unwrap_or_else(|| Rejection::new(origin, "", Reason::Parse, "not valid YAML"))
    })
}

/// Parses the documents of `text`, the first being the file's document `first_document`
/// (from 0): straight into typed objects if every document allows it, else the exact way.
fn parse_documents(
    text: &str,
    first_document: usize,
    origin: &str,
    take: &mut dyn FnMut(Parsed),
) -> Result<Vec<Failed>, Rejection> {
    let mut objects = Vec::new();
    match parse_direct(text, first_document, origin, &mut objects) {
        Some(warnings) => {
            objects.into_iter().for_each(take);
            Ok(warnings)
        }
        None => parse_exact(text, first_document, origin, take),
    }
}

/// The objects of `text` read straight into their types (`direct`), with the unknown-field
/// warnings; `None` if a document is not the common case.
fn parse_direct(
    text: &str,
    first_document: usize,
    origin: &str,
    objects: &mut Vec<Parsed>,
) -> Option<Vec<Failed>> {
    let mut warnings = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path| unknown.push(field_path(&path));
        let read = direct::Read::deserialize(serde_ignored::Deserializer::new(document, &mut note));
        match read.ok()? {
            direct::Read::Nothing => {}
            direct::Read::Bail => return None,
            direct::Read::Object(object) => {
                if !unknown.is_empty() {
                    let kind = object.kind().name();
                    let origin = format!("{origin} (document {})", first_document + i + 1);
                    let described = describe(kind, &object.name(), &origin);
                    warnings.extend(unknown_field_warnings(&described, unknown));
                }
                let print = object_fingerprint(&object);
                objects.push((object, print));
            }
        }
    }
    Some(warnings)
}

/// Parses the documents of `text` through a YAML tree, for exact messages about any input.
fn parse_exact(
    text: &str,
    first_document: usize,
    origin: &str,
    take: &mut dyn FnMut(Parsed),
) -> Result<Vec<Failed>, Rejection> {
    let mut failed = Vec::new();
    let documents = serde_yaml::Deserializer::from_str(text).enumerate();
    for (i, document) in documents {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| {
            Rejection::new(origin, "", Reason::Parse, format!("not valid YAML: {e}"))
        })?;
        if value.is_null() {
            continue;
        }
        let origin = format!("{origin} (document {})", first_document + i + 1);
        if let Err(failure) = object_from_value(value, &origin, &mut *take, &mut failed) {
            failed.push(*failure);
        }
    }
    Ok(failed)
}

/// How messages name an object: `Service shop/web in manifest m.yaml (document 3)`.
fn describe(kind: &str, name: &Name, origin: &str) -> String {
    format!("{kind} {}/{} in {origin}", name.0, name.1)
}

/// One warning per field of `object` that its type does not have.
fn unknown_field_warnings(object: &str, fields: Vec<String>) -> impl Iterator<Item = Failed> {
    fields.into_iter().map(move |field| Failed {
        rejection: Rejection::new(
            object,
            field,
            Reason::UnknownField,
            "unknown field, ignored (misspelt?); the rest of the object is served",
        ),
        keep: None,
    })
}

/// The kind of an `apiVersion`/`kind` pair this source reads.
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    match (api_version, kind) {
        ("v1", "Service") => Some(Kind::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
        ("v1", "Node") => Some(Kind::Node),
        _ => None,
    }
}

/// Takes the object(s) of one document: `take` gets each one; `warnings` the fields it
/// ignored.
fn object_from_value(
    value: serde_yaml::Value,
    origin: &str,
    take: &mut dyn FnMut(Parsed),
    warnings: &mut Vec<Failed>,
) -> Result<(), Box<Failed>> {
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
    let name = (
        meta_text("namespace").unwrap_or_else(|| "default".into()),
        meta_text("name").unwrap_or_default(),
    );
    let object = describe(&kind, &name, origin);
    if api_version == "v1" && kind == "List" {
        let items = value
            .get("items")
            .and_then(|i| i.as_sequence())
            .cloned()
            .unwrap_or_default();
        for (i, item) in items.into_iter().enumerate() {
            object_from_value(item, &format!("{origin} items[{i}]"), take, warnings)?;
        }
        return Ok(());
    }
    let Some(known) = kind_of(&api_version, &kind) else {
        return Err(Box::new(Failed {
            rejection: Rejection::new(
                &object,
                "kind",
                Reason::UnsupportedKind,
                format!(
                    "{api_version} {kind} is not read (only v1 Service, discovery.k8s.io/v1 EndpointSlice and v1 Node)"
                ),
            ),
            keep: None,
        }));
    };
    let mut unknown = Vec::new();
    let typed = match known {
        Kind::Service => typed(value, &mut unknown).map(|s| Object::Service(Box::new(s))),
        Kind::EndpointSlice => {
            typed(value, &mut unknown).map(|s| Object::EndpointSlice(Box::new(s)))
        }
        Kind::Node => typed(value, &mut unknown).map(|n| Object::Node(Box::new(n))),
    };
    let typed = typed.map_err(|(field, detail)| {
        Box::new(Failed {
            rejection: Rejection::new(&object, field, Reason::Parse, detail),
            keep: (!name.1.is_empty()).then(|| (known, name.clone())),
        })
    })?;
    warnings.extend(unknown_field_warnings(&object, unknown));
    let print = object_fingerprint(&typed);
    take((typed, print));
    Ok(())
}

/// A field's path as kubectl writes it: `spec.ports[0].targetport`.
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.clone(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

/// `value` as a `T`; the paths of fields `T` does not have go to `unknown`. An error names
/// the field that did not type-check.
fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    unknown: &mut Vec<String>,
) -> Result<T, (String, String)> {
    let mut note = |path: serde_ignored::Path| unknown.push(field_path(&path));
    let ignored = serde_ignored::Deserializer::new(value, &mut note);
    serde_path_to_error::deserialize(ignored)
        .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parse yields, comparably: (kind, name, fingerprint) of each object, and the
    /// rejections (or the error that rejects the whole text).
    type Outcome = (Vec<(Kind, Name, u64)>, Result<Vec<Rejection>, Rejection>);
    type ParseResult = Result<Vec<Failed>, Rejection>;

    fn outcome(
        text: &str,
        parse: fn(&str, usize, &str, &mut dyn FnMut(Parsed)) -> ParseResult,
    ) -> Outcome {
        let mut objects = Vec::new();
        let failed = parse(text, 0, "m", &mut |(o, print)| {
            objects.push((o.kind(), o.name(), print))
        });
        let rejections = failed.map(|f| f.into_iter().map(|f| f.rejection).collect());
        (objects, rejections)
    }

    /// `text` is read directly (or not), and to the same outcome as the exact way.
    fn assert_read(text: &str, directly: bool) {
        let mut objects = Vec::new();
        let direct = parse_direct(text, 0, "m", &mut objects).is_some();
        assert_eq!(direct, directly, "read directly: {text}");
        assert_eq!(
            outcome(text, parse_documents),
            outcome(text, parse_exact),
            "{text}"
        );
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop, labels: {a: b}}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.0.1], conditions: {ready: true}}]\n";

    #[test]
    fn the_direct_path_reads_what_the_exact_path_reads() {
        let texts = [
            format!("{SERVICE}---\n{SLICE}---\n"),
            // Unknown fields, at the top and inside.
            format!("{SERVICE}colour: blue\n---\n{SLICE}extra: {{x: 1}}\n"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: bare}\n".to_owned(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: n}\nspec: null\nstatus: {}\n".to_owned(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: null\nports: null\n".to_owned(),
            // Fields of the other kind are unknown here.
            "apiVersion: v1\nkind: Service\nmetadata: {name: n}\nendpoints: []\naddressType: IPv4\n".to_owned(),
        ];
        for text in &texts {
            assert_read(text, true);
        }
    }

    #[test]
    fn anything_but_the_common_case_is_read_the_exact_way() {
        let texts = [
            // `kind` after `spec`.
            "metadata: {name: late}\nspec: {ports: [{port: 80}]}\napiVersion: v1\nkind: Service\n".to_owned(),
            // A key twice.
            format!("{SERVICE}spec: {{ports: [{{port: 81}}]}}\n"),
            // A field that does not type-check, in a run with a good object.
            format!("{SLICE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b}}\nspec: {{ports: [{{port: eighty}}]}}\n"),
            // Another kind, a List, no metadata, no addressType, a scalar document.
            format!("{SERVICE}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\ndata: {{a: b}}\n"),
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {ports: [{port: 1}]}}\n".to_owned(),
            "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 1}]}\n".to_owned(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\nendpoints: []\n".to_owned(),
            "just text\n".to_owned(),
        ];
        for text in &texts {
            assert_read(text, false);
        }
        // The good object before the bad one is served either way.
        assert_eq!(outcome(&texts[2], parse_documents).0.len(), 1);
    }

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
        let failed = parse_manifest(text, "manifest m.yaml", |p| objects.push(p)).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(failed.len(), 2);
        assert_eq!(
            failed[0].rejection.object,
            "Service shop/broken in manifest m.yaml (document 2)"
        );
        assert_eq!(failed[0].rejection.field, "spec.ports[0].port");
        let id = (Kind::Service, ("shop".to_owned(), "broken".to_owned()));
        assert_eq!(failed[0].keep, Some(id));
        assert_eq!(failed[1].rejection.reason, Reason::UnsupportedKind);
        assert_eq!(failed[1].keep, None);
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

    #[test]
    fn unknown_fields_are_named_and_the_rest_is_served() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIp: 10.96.0.10\n  ports: [{port: 80, targetport: 8080}]\n";
        let mut objects = Vec::new();
        let failed = parse_manifest(text, "m", |p| objects.push(p)).unwrap();
        assert_eq!(objects.len(), 1);
        let fields: Vec<&str> = failed.iter().map(|f| f.rejection.field.as_str()).collect();
        assert_eq!(fields, ["spec.clusterIp", "spec.ports[0].targetport"]);
        assert!(
            failed
                .iter()
                .all(|f| f.rejection.reason == Reason::UnknownField && f.keep.is_none())
        );
    }

    #[test]
    fn deeply_nested_flow_collections_are_refused_before_parsing() {
        let deep = format!(
            "apiVersion: v1\nkind: Service\nspec: {}{}\n",
            "[".repeat(30_000),
            "]".repeat(30_000)
        );
        let err = parse_manifest(&deep, "m", drop).unwrap_err();
        assert!(
            err.detail.contains("nest deeper than 128 levels at line 3"),
            "{err}"
        );
        // Brackets in quoted scalars and comments do not count.
        let quoted = format!(
            "a: '{}'\nb: \"{}\" # {}\n",
            "[".repeat(200),
            "{".repeat(200),
            "[".repeat(200)
        );
        assert!(too_deep(&quoted).is_none());
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

    #[test]
    fn a_document_that_does_not_type_check_keeps_its_objects_last_valid_version() {
        let dir = std::env::temp_dir().join(format!("proxy-manifest-typed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("svc.yaml");
        std::fs::write(
            &file,
            format!(
                "{}---\n{}",
                service("a", "10.96.0.1"),
                service("b", "10.96.0.2")
            ),
        )
        .unwrap();
        let mut source = ManifestSource::new(&dir);
        assert_eq!(read(&mut source).applied.len(), 2);
        let broken = service("a", "10.96.0.1").replace("port: 1", "port: eighty");
        std::fs::write(&file, format!("{broken}---\n{}", service("b", "10.96.0.3"))).unwrap();
        let changes = read(&mut source);
        assert_eq!(changes.applied, ["b"], "the valid neighbour still changes");
        assert!(
            changes.deleted.is_empty(),
            "a keeps serving: {:?}",
            changes.deleted
        );
        assert_eq!(changes.rejections[0].field, "spec.ports[0].port");
        assert!(
            changes.rejections[0]
                .detail
                .ends_with("still serving its last valid version"),
            "{}",
            changes.rejections[0]
        );
        // A new object that never type-checked has no last version: it is not served.
        std::fs::write(
            &file,
            format!(
                "{broken}---\n{}",
                service("c", "10.96.0.4").replace("port: 1", "port: [1]")
            ),
        )
        .unwrap();
        let changes = read(&mut source);
        assert_eq!(
            changes.deleted,
            [(Kind::Service, ("default".into(), "b".into()))]
        );
        assert!(!changes.rejections[1].detail.contains("still serving"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_large_file_parsed_in_parallel_equals_one_parsed_alone() {
        // Over 2 MiB: cut into runs at `---` lines, parsed on every CPU.
        let mut text = String::from("# services\n");
        for i in 0..9000 {
            let port = if i == 4321 {
                "eighty".to_owned()
            } else {
                "80".to_owned()
            };
            text += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: {port}}}], sessionAffinity: None, type: ClusterIP}}\n",
                i / 250,
                i % 250
            );
        }
        assert!(
            text.len() > 2 * split::RUN_BYTES && split::runs(&text, split::RUN_BYTES).len() > 2
        );
        let names = |objects: &[Parsed]| -> Vec<String> {
            objects.iter().map(|(o, _)| o.name().1).collect()
        };
        let (mut parallel, mut alone) = (Vec::new(), Vec::new());
        let failed = parse_manifest(&text, "m", |p| parallel.push(p)).unwrap();
        let oracle = parse_documents(&text, 0, "m", &mut |p| alone.push(p)).unwrap();
        assert_eq!(names(&parallel), names(&alone));
        assert_eq!(parallel.len(), 8999);
        let objects =
            |f: &[Failed]| -> Vec<String> { f.iter().map(|f| f.rejection.to_string()).collect() };
        assert_eq!(objects(&failed), objects(&oracle));
        assert!(
            failed[0].rejection.object.ends_with("(document 4322)"),
            "{}",
            failed[0].rejection
        );

        // A syntax error late in the file: the same message, lines counted from the top.
        let broken = format!("{text}---\nkind: [Service\n");
        let (mut taken, mut alone) = (0, 0);
        let err = parse_manifest(&broken, "m", |_| taken += 1).unwrap_err();
        let oracle = parse_documents(&broken, 0, "m", &mut |_| alone += 1).unwrap_err();
        assert_eq!(err, oracle);
        assert_eq!(
            taken, alone,
            "the documents before the error are taken, once"
        );
    }
}
