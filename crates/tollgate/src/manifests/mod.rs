//! Kubernetes resources as configuration: the Kuadrant, agentgateway and Gloo documents
//! platform teams already write, run with no cluster.
//!
//! [`load`] reads a file or a folder of multi-document YAML into [`Document`]s (each
//! with its file, number and line offset), then [`translate`] turns them into the
//! native [`Config`] — appended to a native config when both are given — which goes
//! through the same `Runtime::build` as `--config`. `tollgate convert` prints that
//! config, so it means exactly what `serve --manifests` runs.
//!
//! Problems name the file, document, resource and spec field with its line; problems
//! found later by `Runtime::build` (CEL that does not compile, say) are mapped back to
//! the resource through [`Origins`].

mod kinds;
mod translate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::config::{Config, PositionIndex, Problem, Severity};

pub use translate::translate;

/// One YAML document of a manifest file.
pub struct Document {
    pub file: PathBuf,
    /// 1-based position of the document in its file.
    pub number: usize,
    /// Line of the file where the document starts (1-based), minus one.
    line_offset: usize,
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub value: yaml_serde::Value,
    index: PositionIndex,
}

impl Document {
    /// `Kind namespace/name` for messages.
    pub fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    fn where_(&self) -> String {
        format!(
            "{} document {} ({})",
            self.file.display(),
            self.number,
            self.label()
        )
    }

    /// A problem about the field at `field` (a path like `spec.limits.free`).
    pub fn problem(&self, severity: Severity, field: &str, message: impl Into<String>) -> Problem {
        let (line, column) = self
            .index
            .locate(field)
            .map(|(l, c)| (Some(l + self.line_offset), Some(c)))
            .unwrap_or((Some(self.line_offset + 1), None));
        Problem {
            severity,
            path: format!("{} {field}", self.where_()).trim_end().to_owned(),
            line,
            column: column.or(Some(1)),
            message: message.into(),
        }
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> Problem {
        self.problem(Severity::Error, field, message)
    }

    pub fn warning(&self, field: &str, message: impl Into<String>) -> Problem {
        self.problem(Severity::Warning, field, message)
    }

    /// Deserialize a top-level field (`spec`, …) into `T`; unknown fields are errors
    /// naming the field path and line.
    pub fn field<T: DeserializeOwned>(&self, name: &str) -> Result<T, Problem> {
        let v = self
            .value
            .get(name)
            .cloned()
            .unwrap_or(yaml_serde::Value::Null);
        serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
            let sub = e.path().to_string();
            let field = if sub == "." || sub.is_empty() {
                name.to_owned()
            } else if sub.starts_with('[') {
                format!("{name}{sub}")
            } else {
                format!("{name}.{sub}")
            };
            self.error(&field, e.into_inner().to_string())
        })
    }

    pub fn namespace_or_default(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// Top-level fields of the kinds read (and what `kubectl get -o yaml` adds).
const TOP_LEVEL_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "status",
    "data",
    "stringData",
    "type",
    "immutable",
];

/// Read every manifest under `paths` (files, or folders of `.yaml`/`.yml` files read in
/// name order). Environment variables are not substituted: give the manifests as the
/// shell would have applied them.
pub fn load(paths: &[PathBuf]) -> Result<(Vec<Document>, Vec<Problem>), Vec<Problem>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| {
                    vec![Problem::error(
                        "",
                        format!("cannot read {}: {e}", p.display()),
                    )]
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.extension()
                        .and_then(|x| x.to_str())
                        .is_some_and(|x| x == "yaml" || x == "yml")
                })
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(p.clone());
        }
    }
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    for f in &files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem::error(
                    "",
                    format!("cannot read {}: {e}", f.display()),
                ));
                continue;
            }
        };
        parse_file(f, &text, &mut docs, &mut problems);
    }
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(problems);
    }
    Ok((docs, problems))
}

/// Split a file into documents at `---` lines and parse each.
pub fn parse_file(file: &Path, text: &str, docs: &mut Vec<Document>, problems: &mut Vec<Problem>) {
    let mut chunks: Vec<(usize, String)> = vec![(0, String::new())];
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") || t == "..." {
            chunks.push((i + 1, String::new()));
            continue;
        }
        if let Some((_, buf)) = chunks.last_mut() {
            buf.push_str(line);
            buf.push('\n');
        }
    }
    let mut number = 0;
    for (offset, chunk) in chunks {
        let meaningful = chunk
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        if !meaningful {
            continue;
        }
        number += 1;
        let at = format!("{} document {number}", file.display());
        let value: yaml_serde::Value = match yaml_serde::from_str(&chunk) {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem {
                    severity: Severity::Error,
                    path: at,
                    line: e.location().map(|l| l.line() + offset),
                    column: e.location().map(|l| l.column()),
                    message: format!("not valid YAML: {e}"),
                });
                continue;
            }
        };
        let s = |v: Option<&yaml_serde::Value>| v.and_then(|x| x.as_str()).map(str::to_owned);
        let meta = value.get("metadata");
        let map = |key: &str| -> BTreeMap<String, String> {
            meta.and_then(|m| m.get(key))
                .and_then(|m| m.as_mapping())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| {
                            let v = match v {
                                yaml_serde::Value::String(s) => s.clone(),
                                yaml_serde::Value::Number(n) => n.to_string(),
                                yaml_serde::Value::Bool(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((k.as_str()?.to_owned(), v))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (Some(api_version), Some(kind)) = (s(value.get("apiVersion")), s(value.get("kind")))
        else {
            problems.push(Problem {
                severity: Severity::Error,
                path: at,
                line: Some(offset + 1),
                column: Some(1),
                message: "not a Kubernetes resource: `apiVersion` and `kind` are required".into(),
            });
            continue;
        };
        let unknown: Vec<String> = value
            .as_mapping()
            .map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str())
                    .filter(|k| !TOP_LEVEL_FIELDS.contains(k))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let name = s(meta.and_then(|m| m.get("name")));
        let doc = Document {
            file: file.to_owned(),
            number,
            line_offset: offset,
            api_version,
            kind,
            name: name.clone().unwrap_or_default(),
            namespace: s(meta.and_then(|m| m.get("namespace"))),
            labels: map("labels"),
            annotations: map("annotations"),
            index: PositionIndex::build(&chunk),
            value,
        };
        if name.is_none() {
            problems.push(doc.error("metadata.name", "`metadata.name` is required"));
            continue;
        }
        if !unknown.is_empty() {
            for k in unknown {
                problems.push(doc.error(&k, format!("unknown field `{k}`")));
            }
            continue;
        }
        docs.push(doc);
    }
}

/// Where each translated part of the config came from, to relocate problems that
/// `Runtime::build` finds in it.
#[derive(Default)]
pub struct Origins {
    /// Native config path prefix → a problem template (resource, field, line).
    entries: Vec<(String, Problem)>,
    /// Native policy paths whose limits are meant to have no counters (one budget for
    /// every caller, as agentgateway's local limits): no warning about that.
    shared_budgets: Vec<String>,
}

impl Origins {
    pub fn shared_budget(&mut self, native_policy_path: String) {
        self.shared_budgets.push(native_policy_path);
    }

    /// [`Origins::relocate`] each problem, leaving out warnings the translation expects.
    pub fn relocate_all(&self, problems: Vec<Problem>) -> Vec<Problem> {
        problems
            .into_iter()
            .filter(|p| {
                !(p.severity == Severity::Warning
                    && p.path.ends_with(".counters")
                    && self
                        .shared_budgets
                        .iter()
                        .any(|b| p.path.starts_with(&format!("{b}."))))
            })
            .map(|p| self.relocate(p))
            .collect()
    }

    pub fn record(&mut self, native_path: impl Into<String>, at: Problem) {
        self.entries.push((native_path.into(), at));
    }

    /// Name the manifest behind a problem about the translated config.
    pub fn relocate(&self, p: Problem) -> Problem {
        let best = self
            .entries
            .iter()
            .filter(|(prefix, _)| {
                p.path == *prefix
                    || p.path.starts_with(prefix.as_str())
                        && matches!(p.path.as_bytes().get(prefix.len()), Some(b'.' | b'['))
            })
            .max_by_key(|(prefix, _)| prefix.len());
        match best {
            None => p,
            Some((_, at)) => Problem {
                severity: p.severity,
                path: at.path.clone(),
                line: at.line,
                column: at.column,
                message: format!("{} (as `{}` in the native config)", p.message, p.path),
            },
        }
    }
}

/// The native config and its position index (from `--config`, or empty), with the
/// manifests translated on top. Problems about the manifests name their documents.
pub fn build_config(
    config: Option<&Path>,
    manifests: &[PathBuf],
    backends: &BTreeMap<String, String>,
) -> Result<(Config, PositionIndex, Origins, Vec<Problem>), Vec<Problem>> {
    let (base, index) = match config {
        Some(p) => {
            let (_, cfg, idx) = crate::config::read(p)?;
            (Some(cfg), idx)
        }
        None => (None, PositionIndex::default()),
    };
    let (docs, mut warnings) = load(manifests)?;
    let t = translate(&docs, base, backends)?;
    warnings.extend(t.warnings);
    Ok((t.config, index, t.origins, warnings))
}

/// A config from manifests (on top of `base`, a native config, when given), ready for
/// `Runtime::build`.
pub struct Translation {
    pub config: Config,
    pub warnings: Vec<Problem>,
    pub origins: Origins,
}

/// The config as YAML for `tollgate convert`, in schema order, without unset fields.
pub fn to_yaml(cfg: &Config) -> Result<String, String> {
    fn prune(v: &mut yaml_serde::Value) {
        match v {
            yaml_serde::Value::Mapping(m) => {
                m.retain(|_, x| !x.is_null());
                for (_, x) in m.iter_mut() {
                    prune(x);
                }
            }
            yaml_serde::Value::Sequence(a) => a.iter_mut().for_each(prune),
            _ => {}
        }
    }
    let mut v = yaml_serde::to_value(cfg).map_err(|e| e.to_string())?;
    prune(&mut v);
    yaml_serde::to_string(&v).map_err(|e| e.to_string())
}
