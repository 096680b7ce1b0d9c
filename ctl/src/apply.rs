//! apply and delete -f: read every source, validate every object, and only then write (Namespaces first, so the
//! objects that live in them find them).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kube_objects::{parse_manifests, validate, Document, Kind, Namespace, Object, ObjectMeta};
use store::Store;

/// The documents of files, directories (their .yaml, .yml and .json files, sorted) and `-` (stdin).
pub fn read_all(sources: &[String]) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for s in sources {
        if s == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
            docs.extend(parse_manifests(&text, "-")?);
            continue;
        }
        let path = Path::new(s);
        let files: Vec<std::path::PathBuf> = if path.is_dir() {
            let mut v: Vec<_> = std::fs::read_dir(path)
                .with_context(|| format!("reading {s}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        for f in files {
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            docs.extend(parse_manifests(&text, &f.display().to_string())?);
        }
    }
    Ok(docs)
}

pub async fn apply(store: &mut Store, mut docs: Vec<Document>) -> Result<()> {
    let cfg = store.config().await?;
    // Everything is checked before anything is written.
    let mut errors = Vec::new();
    for d in &docs {
        if let Err(errs) = validate(&d.object, &cfg.service_cidrs, cfg.node_ports) {
            for e in errs {
                errors.push(format!("{}: {e}", d.place()));
            }
        }
    }
    let mut seen = BTreeSet::new();
    for d in &docs {
        let m = d.object.meta();
        if !seen.insert((d.object.kind(), m.namespace.clone(), m.name.clone())) {
            errors.push(format!("{}: {} appears twice", d.place(), d.object.reference()));
        }
    }
    // Namespaces must exist or come in the same apply ("default" is made on first use).
    let new_ns: BTreeSet<String> =
        docs.iter().filter(|d| d.object.kind() == Kind::Namespace).map(|d| d.object.meta().name.clone()).collect();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for d in &docs {
        if let Some(ns) = &d.object.meta().namespace {
            if !new_ns.contains(ns) && ns != "default" && store.get(Kind::Namespace, None, ns).await?.is_none() {
                errors.push(format!("{}: metadata.namespace: namespaces \"{ns}\" not found", d.place()));
            }
            needed.insert(ns.clone());
        }
    }
    if !errors.is_empty() {
        bail!("nothing was applied:\n  {}", errors.join("\n  "));
    }
    if needed.contains("default")
        && !new_ns.contains("default")
        && store.get(Kind::Namespace, None, "default").await?.is_none()
    {
        let mut ns = Object::Namespace(Namespace {
            metadata: ObjectMeta { name: "default".into(), ..Default::default() },
            ..Default::default()
        });
        ns.apply_defaults();
        store.put(ns).await?;
    }
    docs.sort_by_key(|d| d.object.kind());
    for d in docs {
        let reference = d.object.reference();
        let (_, outcome) = store.put(d.object).await.with_context(|| format!("{}: document {}", d.source, d.index))?;
        tracing::debug!(object = %reference, source = %d.source, document = d.index, outcome = outcome.as_str(), "applied");
        println!("{reference} {}", outcome.as_str());
    }
    Ok(())
}

pub async fn delete_docs(store: &mut Store, mut docs: Vec<Document>) -> Result<()> {
    // Namespaces last: deleting one takes its objects with it.
    docs.sort_by_key(|d| std::cmp::Reverse(d.object.kind()));
    let mut missing = Vec::new();
    for d in docs {
        let m = d.object.meta();
        let kind = d.object.kind();
        if store.delete(kind, m.namespace.as_deref(), &m.name).await? {
            println!("{} \"{}\" deleted", kind.name().to_ascii_lowercase(), m.name);
        } else {
            missing.push(format!("{} \"{}\" not found", kind.plural(), m.name));
        }
    }
    if !missing.is_empty() {
        bail!("(NotFound): {}", missing.join(", "));
    }
    Ok(())
}
