//! Every call into the `cel` crate lives here: its API breaks with each minor release,
//! so the rest of tollgate sees only [`Expr`], [`Attrs`] and [`EvalError`].
//!
//! Expressions compile once, at config load, against one shared environment (standard
//! library plus the strings extension for `split`, `lowerAscii`, …). The request path
//! only builds an activation ([`Attrs`]) and evaluates.

mod fast;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cel::objects::Key;
pub use cel::Value;
use cel::{Context, Env};

/// A compiled CEL expression with its source (for error messages and the admin API).
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<cel::Program>,
    /// The same expression for the direct evaluator, when it is in its subset.
    fast: Option<Arc<fast::Fast>>,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

/// Rewrite `request.auth` (outside string literals, not as part of a longer name) to
/// `auth`: Kuadrant accepts both spellings for the same attributes.
fn alias_request_auth(source: &str) -> std::borrow::Cow<'_, str> {
    const ALIAS: &str = "request.auth";
    if !source.contains(ALIAS) {
        return std::borrow::Cow::Borrowed(source);
    }
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' {
                // Copy the escape and the escaped character as they are.
                let end = (i + 2).min(bytes.len());
                out.push_str(source.get(i..end).unwrap_or(""));
                i = end;
                continue;
            }
            if b == q {
                quote = None;
            }
        } else if b == b'"' || b == b'\'' {
            quote = Some(b);
        } else if source[i..].starts_with(ALIAS) {
            let before_ok = i == 0 || {
                let p = bytes[i - 1];
                !(p.is_ascii_alphanumeric() || p == b'_' || p == b'.')
            };
            let after_ok = bytes
                .get(i + ALIAS.len())
                .is_none_or(|a| !(a.is_ascii_alphanumeric() || *a == b'_'));
            if before_ok && after_ok {
                out.push_str("auth");
                i += ALIAS.len();
                continue;
            }
        }
        let ch_len = source[i..].chars().next().map(char::len_utf8).unwrap_or(1);
        out.push_str(&source[i..i + ch_len]);
        i += ch_len;
    }
    std::borrow::Cow::Owned(out)
}

/// A compile error with its position inside the expression (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at {line}:{column} of the expression)")]
pub struct CompileError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why an expression could not be evaluated for one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Execution(String),
    #[error("expected {expected}, got {got}")]
    Type { expected: &'static str, got: String },
}

fn env() -> Arc<Env> {
    static ENV: OnceLock<Arc<Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Env::stdlib();
        // Registering a built-in extension into a fresh stdlib env cannot conflict; if a
        // future release makes it fail, expressions using `split` fail to compile, loudly.
        let _ = env.add_extension(cel::extensions::strings);
        Arc::new(env)
    })
    .clone()
}

impl Expr {
    /// Compile `source`. `request.auth.…` is read as `auth.…` (Kuadrant's alias, as in
    /// its blog's predicates); the source kept for messages is the original.
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        let normalized = alias_request_auth(source);
        match env().compile(&normalized) {
            Ok(program) => Ok(Self {
                source: Arc::from(source),
                fast: fast::compile(program.expression()).map(Arc::new),
                program: Arc::new(program),
            }),
            Err(errors) => {
                let first = errors.errors.first();
                Err(CompileError {
                    line: first.map(|e| e.pos.0.max(1) as usize).unwrap_or(1),
                    column: first.map(|e| e.pos.1.max(0) as usize + 1).unwrap_or(1),
                    message: errors
                        .errors
                        .iter()
                        .map(|e| e.msg.clone())
                        .collect::<Vec<_>>()
                        .join("; "),
                })
            }
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Top-level variables the expression reads (`request`, `auth`, …).
    pub fn references_variable(&self, name: &str) -> bool {
        self.program.references().has_variable(name)
    }

    /// Every `a.b.c` member path the expression reads, as dotted strings (best effort,
    /// used for config warnings about attributes no auth source produces).
    pub fn member_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_paths(&self.source, &mut out);
        out
    }

    /// The first-level fields of top-level variable `var` the expression reads
    /// (`request.path` → `path`), or `None` when it may read the variable in a way this
    /// cannot see (used whole, indexed, spelled with spaces): then every field must be
    /// there. Lets the request path build only what some expression reads.
    pub fn fields_read(&self, var: &str) -> Option<Vec<String>> {
        if !self.references_variable(var) {
            return Some(Vec::new());
        }
        let mut fields = Vec::new();
        for token in identifier_chains(&self.source) {
            if token == var {
                return None;
            }
            if let Some(rest) = token.strip_prefix(var).and_then(|r| r.strip_prefix('.')) {
                match rest.split('.').next() {
                    Some(f) if !f.is_empty() => fields.push(f.to_owned()),
                    _ => return None,
                }
            }
        }
        Some(fields)
    }

    /// Evaluate: directly when the expression is in the direct evaluator's subset and
    /// the answer is plain, else with the interpreter (see `fast`).
    pub fn eval(&self, attrs: &Attrs) -> Result<Value, EvalError> {
        if let Some(f) = &self.fast {
            let mut locals = Vec::new();
            if let Some(v) = f.eval(&attrs.vars, &mut locals) {
                return Ok(v.into_owned());
            }
        }
        self.interpret(attrs)
    }

    /// Evaluate with the `cel` interpreter only.
    pub fn interpret(&self, attrs: &Attrs) -> Result<Value, EvalError> {
        self.program
            .execute(attrs.context())
            .map_err(|e| EvalError::Execution(e.to_string()))
    }

    /// Whether the direct evaluator handles this expression (when its answer is plain).
    pub fn is_direct(&self) -> bool {
        self.fast.is_some()
    }

    /// The direct evaluator's answer alone (`None`: it steps aside), for tests.
    #[cfg(test)]
    fn eval_direct(&self, attrs: &Attrs) -> Option<Value> {
        let f = self.fast.as_ref()?;
        let mut locals = Vec::new();
        f.eval(&attrs.vars, &mut locals)
            .map(std::borrow::Cow::into_owned)
    }

    pub fn eval_bool(&self, attrs: &Attrs) -> Result<bool, EvalError> {
        match self.eval(attrs)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError::Type {
                expected: "bool",
                got: type_name(&other),
            }),
        }
    }

    /// A counter value: strings as they are, numbers and bools printed.
    pub fn eval_key(&self, attrs: &Attrs) -> Result<String, EvalError> {
        match self.eval(attrs)? {
            Value::String(s) => Ok(s.as_str().to_owned()),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            other => Err(EvalError::Type {
                expected: "string or number",
                got: type_name(&other),
            }),
        }
    }

    /// A cost: non-negative integer (negative clamps to 0, floats round up).
    pub fn eval_cost(&self, attrs: &Attrs) -> Result<u64, EvalError> {
        match self.eval(attrs)? {
            Value::Int(i) => Ok(i.max(0) as u64),
            Value::UInt(u) => Ok(u),
            Value::Float(f) if f.is_finite() => Ok(f.max(0.0).ceil() as u64),
            other => Err(EvalError::Type {
                expected: "number",
                got: type_name(&other),
            }),
        }
    }
}

fn type_name(v: &Value) -> String {
    match v {
        Value::List(_) => "list",
        Value::Map(_) => "map",
        Value::Function(..) => "function",
        Value::Int(_) => "int",
        Value::UInt(_) => "uint",
        Value::Float(_) => "double",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        _ => "other",
    }
    .to_owned()
}

/// Dotted identifier chains in the source (`auth.identity.groups`), skipping string
/// literals. Good enough for warnings; never used for evaluation.
fn collect_paths(src: &str, out: &mut Vec<String>) {
    out.extend(identifier_chains(src));
    out.retain(|p| p.contains('.') && !p.starts_with(|c: char| c.is_ascii_digit()));
    for p in out.iter_mut() {
        while p.ends_with('.') {
            p.pop();
        }
    }
}

/// Every identifier chain outside string literals (`auth.identity.groups`, `size`, `x`),
/// in order.
fn identifier_chains(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = src.char_indices().peekable();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    while let Some((_, c)) = chars.next() {
        if let Some(q) = quote {
            if c == '\\' {
                chars.next();
            } else if c == q {
                quote = None;
            }
            continue;
        }
        if c == '"' || c == '\'' {
            quote = Some(c);
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || (c == '.' && !current.is_empty()) {
            current.push(c);
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The activation of one request: top-level variables by name. The CEL context is
/// built once, on the first evaluation, and shared by every expression of the request
/// (converting the variables is most of an evaluation's cost).
#[derive(Default)]
pub struct Attrs {
    vars: Vec<(&'static str, Attr)>,
    ctx: OnceLock<Context<'static, 'static>>,
}

impl std::fmt::Debug for Attrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attrs").field("vars", &self.vars).finish()
    }
}

impl Clone for Attrs {
    fn clone(&self) -> Self {
        Self {
            vars: self.vars.clone(),
            ctx: OnceLock::new(),
        }
    }
}

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set(&mut self, name: &'static str, value: impl Into<Attr>) {
        let value = value.into();
        // A change invalidates the built context.
        self.ctx = OnceLock::new();
        if let Some(slot) = self.vars.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.vars.push((name, value));
        }
    }
    fn context(&self) -> &Context<'static, 'static> {
        self.ctx.get_or_init(|| {
            let mut ctx = Context::with_env(env());
            for (name, attr) in &self.vars {
                ctx.add_variable_from_value(*name, attr.value().clone());
            }
            ctx
        })
    }
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.vars
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a.value())
    }
}

/// One variable (or one field of a record) as the evaluators read it: a CEL value, or a
/// [`Record`].
#[derive(Debug, Clone)]
pub enum Attr {
    Value(Value),
    Record(Arc<Record>),
}

impl Attr {
    /// `v` as a record when it is a map with only string keys, else as it is.
    pub fn from_value(v: &Value) -> Self {
        match Record::from_value(v) {
            Some(r) => Attr::Record(r),
            None => Attr::Value(v.clone()),
        }
    }

    /// The CEL value (a record's map, built on first use).
    pub fn value(&self) -> &Value {
        match self {
            Attr::Value(v) => v,
            Attr::Record(r) => r.value(),
        }
    }
}

impl From<Value> for Attr {
    fn from(v: Value) -> Self {
        Attr::Value(v)
    }
}

impl From<Arc<Record>> for Attr {
    fn from(r: Arc<Record>) -> Self {
        Attr::Record(r)
    }
}

/// A CEL map with string keys kept as a short list of fields: the direct evaluator finds
/// `request.path` or `auth.identity.userid` by comparing a few names, where the `cel`
/// crate's map would hash the key (SipHash) at every step, and a request's attributes
/// cost no hash map to build. The map itself is built only when something needs the
/// whole value (the interpreter, or an expression using the record whole).
#[derive(Debug)]
pub struct Record {
    fields: Vec<(Cow<'static, str>, Attr)>,
    value: OnceLock<Value>,
}

impl Record {
    /// A record of these fields; a name given twice keeps its last value, as a map would.
    pub fn new<I, K, V>(fields: I) -> Arc<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<Cow<'static, str>>,
        V: Into<Attr>,
    {
        Arc::new(Self {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            value: OnceLock::new(),
        })
    }

    /// A map value with only string keys, as a record (nested such maps too) that answers
    /// with that same value when used whole; `None` for anything else.
    pub fn from_value(v: &Value) -> Option<Arc<Self>> {
        let Value::Map(m) = v else { return None };
        let mut fields = Vec::with_capacity(m.map.len());
        for (k, v) in m.map.iter() {
            let Key::String(name) = k else { return None };
            fields.push((Cow::Owned(name.as_str().to_owned()), Attr::from_value(v)));
        }
        let value = OnceLock::new();
        let _ = value.set(v.clone());
        Some(Arc::new(Self { fields, value }))
    }

    /// The field `name` (the last one so named).
    pub fn get(&self, name: &str) -> Option<&Attr> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// The CEL map of the fields.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| {
            let map: HashMap<Key, Value> = self
                .fields
                .iter()
                .map(|(k, a)| (Key::String(Arc::new(k.to_string())), a.value().clone()))
                .collect();
            Value::from(map)
        })
    }
}

/// Build a CEL map from string keys.
pub fn map<I, K>(entries: I) -> Value
where
    I: IntoIterator<Item = (K, Value)>,
    K: Into<String>,
{
    let map: HashMap<Key, Value> = entries
        .into_iter()
        .map(|(k, v)| (Key::String(Arc::new(k.into())), v))
        .collect();
    Value::from(map)
}

pub fn string(s: impl Into<String>) -> Value {
    Value::String(Arc::new(s.into()))
}

pub fn uint(n: u64) -> Value {
    Value::UInt(n)
}

pub fn int(n: i64) -> Value {
    Value::Int(n)
}

/// Convert JSON (claims, identities from config) into a CEL value.
pub fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => string(s.as_str()),
        serde_json::Value::Array(a) => Value::List(Arc::new(a.iter().map(from_json).collect())),
        serde_json::Value::Object(o) => map(o.iter().map(|(k, v)| (k.clone(), from_json(v)))),
    }
}

/// Convert a CEL value back to JSON (for logs and the usage API). Opaque values become null.
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::UInt(u) => (*u).into(),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::String(s) => s.as_str().into(),
        Value::List(l) => serde_json::Value::Array(l.iter().map(to_json).collect()),
        Value::Map(m) => serde_json::Value::Object(
            m.map
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Key::String(s) => s.as_str().to_owned(),
                        Key::Int(i) => i.to_string(),
                        Key::Uint(u) => u.to_string(),
                        Key::Bool(b) => b.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        _ => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_auth_is_an_alias_of_auth() {
        assert_eq!(
            alias_request_auth(r#"request.auth.identity.x == "request.auth" && myrequest.auth"#),
            r#"auth.identity.x == "request.auth" && myrequest.auth"#
        );
        let e = Expr::compile(
            r#"request.auth.identity.metadata.annotations["kuadrant.io/groups"].split(",").exists(g, g == "free")"#,
        )
        .unwrap();
        let mut a = Attrs::new();
        a.set(
            "auth",
            map([(
                "identity",
                map([(
                    "metadata",
                    map([(
                        "annotations",
                        map([("kuadrant.io/groups", string("gold,free"))]),
                    )]),
                )]),
            )]),
        );
        assert!(e.eval_bool(&a).unwrap());
        assert!(e.source().starts_with("request.auth."));
    }

    fn attrs_with_groups(groups: &str) -> Attrs {
        let mut a = Attrs::new();
        a.set(
            "auth",
            map([(
                "identity",
                map([("groups", string(groups)), ("userid", string("user-1"))]),
            )]),
        );
        a.set("request", map([("path", string("/v1/chat/completions"))]));
        a
    }

    #[test]
    fn tutorial_predicate_with_split() {
        let e = Expr::compile(r#"auth.identity.groups.split(",").exists(g, g == "free")"#).unwrap();
        assert!(e.eval_bool(&attrs_with_groups("a,free")).unwrap());
        assert!(!e.eval_bool(&attrs_with_groups("gold")).unwrap());
    }

    #[test]
    fn missing_attribute_is_an_error_not_false() {
        let e = Expr::compile("auth.identity.tier == 'x'").unwrap();
        assert!(e.eval_bool(&attrs_with_groups("free")).is_err());
    }

    #[test]
    fn non_bool_predicate_is_a_type_error() {
        let e = Expr::compile("auth.identity.userid").unwrap();
        assert!(matches!(
            e.eval_bool(&attrs_with_groups("free")),
            Err(EvalError::Type { .. })
        ));
        assert_eq!(e.eval_key(&attrs_with_groups("free")).unwrap(), "user-1");
    }

    #[test]
    fn compile_error_has_position() {
        let err = Expr::compile("request.path == ").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.column > 1, "{err:?}");
    }

    #[test]
    fn cost_expression() {
        let mut a = Attrs::new();
        a.set(
            "usage",
            map([
                ("input_tokens", int(100)),
                ("cached_input_tokens", int(40)),
                ("output_tokens", int(10)),
            ]),
        );
        // The issue's own example, with plain int literals: usage numbers are ints.
        let e = Expr::compile(
            "usage.input_tokens - usage.cached_input_tokens / 2 + 4 * usage.output_tokens",
        )
        .unwrap();
        assert_eq!(e.eval_cost(&a).unwrap(), 100 - 20 + 40);
    }

    #[test]
    fn fields_read_sees_member_access_and_gives_up_on_whole_use() {
        let e = Expr::compile(r#"request.path == "/v1/x" && has(request.model)"#).unwrap();
        assert_eq!(
            e.fields_read("request"),
            Some(vec!["path".to_owned(), "model".to_owned()])
        );
        assert_eq!(e.fields_read("source"), Some(vec![]));
        // A string that looks like a path is not a read.
        let e = Expr::compile(r#"auth.identity.userid == "request.id""#).unwrap();
        assert_eq!(e.fields_read("request"), Some(vec![]));
        for whole in [
            r#"request["path"] == "/x""#,
            r#""path" in request"#,
            r#"request .path == "/x""#,
            r#"size(request) > 0"#,
        ] {
            let e = Expr::compile(whole).unwrap();
            assert_eq!(e.fields_read("request"), None, "{whole}");
        }
    }

    #[test]
    fn member_paths_skip_literals() {
        let e = Expr::compile(r#"auth.identity.groups.split(",").exists(g, g == "a.b")"#).unwrap();
        let paths = e.member_paths();
        assert!(paths.iter().any(|p| p.starts_with("auth.identity.groups")));
        assert!(!paths.iter().any(|p| p == "a.b"));
    }

    #[test]
    fn json_round_trip() {
        let j = serde_json::json!({"a": [1, "x", true, null], "b": {"c": 2.5}});
        assert_eq!(to_json(&from_json(&j)), j);
    }
}
