//! Manifests as kubectl reads them: one or more YAML documents (`---`), or JSON, each an object or a `List` of
//! them. Every error names the document it is in, so a file can be rejected as a whole with a precise reason.

use serde_json::Value;

use crate::objects::Object;

/// One object of a manifest, and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The source (file name, or `-`) and the document's 1-based position in it.
    pub source: String,
    pub index: usize,
    pub object: Object,
}

impl Document {
    /// `examples/redis.yaml: document 2 (service/redis)`: how errors point at it.
    pub fn place(&self) -> String {
        format!("{}: document {} ({})", self.source, self.index, self.object.reference())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {index}: {reason}")]
pub struct ManifestError {
    pub source_name: String,
    pub index: usize,
    pub reason: String,
}

const KINDS: &str = "Namespace, Pod, Node, Service, Endpoints, NetworkPolicy";

/// Parses every document of `text` (YAML or JSON), defaults applied. Empty documents are skipped.
pub fn parse_manifests(text: &str, source: &str) -> Result<Vec<Document>, ManifestError> {
    let err = |index: usize, reason: String| ManifestError { source_name: source.to_string(), index, reason };
    let mut values = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        // JSON, possibly several values one after another.
        for (i, v) in serde_json::Deserializer::from_str(text).into_iter::<Value>().enumerate() {
            values.push(v.map_err(|e| err(i + 1, format!("invalid JSON: {e}")))?);
        }
    } else {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let v: Value =
                serde::Deserialize::deserialize(doc).map_err(|e| err(i + 1, format!("invalid YAML: {e}")))?;
            values.push(v);
        }
    }
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let index = i + 1;
        if v.is_null() {
            continue;
        }
        let items = match v.get("kind").and_then(Value::as_str) {
            Some("List") => match v.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => return Err(err(index, "a List needs an items array".into())),
            },
            _ => vec![v],
        };
        for item in items {
            out.push(Document {
                source: source.to_string(),
                index,
                object: to_object(item).map_err(|r| err(index, r))?,
            });
        }
    }
    Ok(out)
}

/// One object from its JSON form, with the field at fault named on a type error.
pub fn to_object(v: Value) -> Result<Object, String> {
    let kind = match v.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err("kind: must be a string".into()),
        None => return Err("kind: Required value".into()),
    };
    if !KINDS.split(", ").any(|k| k == kind) {
        return Err(format!("kind: Unsupported value: {kind:?}: Tartan stores {KINDS}"));
    }
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_string();
    let want = if kind == "NetworkPolicy" { "networking.k8s.io/v1" } else { "v1" };
    if api != want {
        return Err(format!("apiVersion: Unsupported value: {api:?}: {kind} is {want:?}"));
    }
    let mut obj: Object = match serde_json::from_value(v.clone()) {
        Ok(o) => o,
        // serde loses the path inside tagged enums and flattened fields: find the field by taking parts away.
        Err(e) => return Err(format!("{}: {e}", locate(&v))),
    };
    obj.apply_defaults();
    Ok(obj)
}

/// The path of the smallest part of `root` whose removal makes it decode (`spec.ports[0].port`).
fn locate(root: &Value) -> String {
    let decodes = |v: &Value| serde_json::from_value::<Object>(v.clone()).is_ok();
    let mut path: Vec<PathPart> = Vec::new();
    'descend: loop {
        let node = get(root, &path);
        let children: Vec<PathPart> = match node {
            Some(Value::Object(m)) => m.keys().filter(|k| *k != "kind").cloned().map(PathPart::Key).collect(),
            Some(Value::Array(a)) => (0..a.len()).map(PathPart::Index).collect(),
            _ => Vec::new(),
        };
        for c in children {
            let mut trial = root.clone();
            let mut p = path.clone();
            p.push(c.clone());
            remove(&mut trial, &p);
            if decodes(&trial) {
                path = p;
                continue 'descend;
            }
        }
        break;
    }
    let mut s = String::new();
    for p in &path {
        match p {
            PathPart::Key(k) if s.is_empty() => s += k,
            PathPart::Key(k) => s += &format!(".{k}"),
            PathPart::Index(i) => s += &format!("[{i}]"),
        }
    }
    if s.is_empty() {
        "(document)".into()
    } else {
        s
    }
}

#[derive(Debug, Clone)]
enum PathPart {
    Key(String),
    Index(usize),
}

fn get<'a>(v: &'a Value, path: &[PathPart]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, p| match p {
        PathPart::Key(k) => v.get(k),
        PathPart::Index(i) => v.get(*i),
    })
}

fn remove(v: &mut Value, path: &[PathPart]) {
    let Some((last, parent)) = path.split_last() else { return };
    let mut cur = v;
    for p in parent {
        cur = match p {
            PathPart::Key(k) => match cur.get_mut(k) {
                Some(x) => x,
                None => return,
            },
            PathPart::Index(i) => match cur.get_mut(*i) {
                Some(x) => x,
                None => return,
            },
        };
    }
    match (cur, last) {
        (Value::Object(m), PathPart::Key(k)) => {
            m.remove(k);
        }
        (Value::Array(a), PathPart::Index(i)) if *i < a.len() => {
            a.remove(*i);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_lists_and_json() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: dev\n---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {ports: [{port: 80}]}\n";
        let docs = parse_manifests(yaml, "f.yaml").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].object.meta().labels["kubernetes.io/metadata.name"], "dev");
        assert_eq!(docs[1].index, 3);
        assert_eq!(docs[1].place(), "f.yaml: document 3 (service/a)");
        let json = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c"}]}}"#;
        let docs = parse_manifests(json, "-").unwrap();
        assert_eq!(docs[0].object.meta().namespace.as_deref(), Some("default"));
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let e = parse_manifests("kind: Deployment\napiVersion: apps/v1\n", "d.yaml").unwrap_err();
        assert!(e.to_string().starts_with("d.yaml: document 1: kind: Unsupported value: \"Deployment\""), "{e}");
        let bad = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: eighty}]}\n";
        let e = parse_manifests(bad, "s.yaml").unwrap_err();
        assert_eq!(e.index, 2);
        assert!(e.reason.starts_with("spec.ports[0].port: "), "{e}");
        let e = parse_manifests("kind: Service\napiVersion: v2\n", "x").unwrap_err();
        assert!(e.reason.starts_with("apiVersion: Unsupported value"), "{e}");
        assert!(parse_manifests("a: [", "y").unwrap_err().reason.starts_with("invalid YAML"));
    }
}
