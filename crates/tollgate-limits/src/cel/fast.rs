//! A direct evaluator for the expressions policies are made of: attribute paths, string
//! and number comparisons, `&&`/`||`/`!`, `in`, `has()`, `split`, `startsWith`,
//! `endsWith`, `contains`, `lowerAscii`, and the `exists`/`all` macros.
//!
//! It reads the request's variables ([`super::Attrs`]) as they are, with no CEL context
//! to build, and walks a tree compiled once from the `cel` crate's own AST. It only ever
//! answers when the answer is plain: a missing attribute, a type it does not handle, an
//! error anywhere (even one CEL's `&&`/`||` would absorb) makes it step aside
//! ([`None`]), and the `cel` interpreter evaluates the expression instead. So errors,
//! messages and every corner of CEL's semantics stay the interpreter's; this only makes
//! the common, error-free cases cheap. `tests` compare the two on many expressions and
//! activations.

use std::borrow::Cow;
use std::sync::Arc;

use cel::common::ast::{operators, ComprehensionExpr, Expr, IdedExpr, LiteralValue};
use cel::objects::Key;
use cel::Value;

use super::{Attr, Record};

/// A compiled expression of the supported subset.
#[derive(Debug)]
pub(super) enum Fast {
    Lit(Value),
    /// A top-level variable, or a macro's loop variable.
    Var(String),
    /// `operand.field` on a map.
    Select(Box<Fast>, Key),
    /// `has(operand.field)` on a map.
    Has(Box<Fast>, Key),
    /// `operand[index]` on a map with a string key.
    Index(Box<Fast>, Box<Fast>),
    /// `==` (`true`) or `!=` (`false`).
    Eq(Box<Fast>, Box<Fast>, bool),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
    /// `element in list`.
    In(Box<Fast>, Box<Fast>),
    Str(StrFn, Box<Fast>, Box<Fast>),
    Lower(Box<Fast>),
    Split(Box<Fast>, Box<Fast>),
    /// `range.exists(var, pred)` (`true`) or `range.all(var, pred)` (`false`).
    Quantifier {
        exists: bool,
        range: Box<Fast>,
        var: String,
        pred: Box<Fast>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum StrFn {
    StartsWith,
    EndsWith,
    Contains,
}

/// Compile `e`, or `None` when any part of it is outside the subset.
pub(super) fn compile(e: &IdedExpr) -> Option<Fast> {
    Some(match &e.expr {
        Expr::Literal(l) => Fast::Lit(match l {
            LiteralValue::Boolean(b) => Value::Bool(*b.inner()),
            LiteralValue::Int(i) => Value::Int(*i.inner()),
            LiteralValue::UInt(u) => Value::UInt(*u.inner()),
            LiteralValue::String(s) => Value::String(Arc::new(s.inner().to_owned())),
            LiteralValue::Null => Value::Null,
            _ => return None,
        }),
        Expr::Ident(name) if !name.starts_with('@') => Fast::Var(name.clone()),
        Expr::Select(s) => {
            let key = Key::String(Arc::new(s.field.clone()));
            let operand = Box::new(compile(&s.operand)?);
            if s.test {
                Fast::Has(operand, key)
            } else {
                Fast::Select(operand, key)
            }
        }
        Expr::Call(call) => {
            let args = &call.args;
            let arg = |i: usize| compile(args.get(i)?).map(Box::new);
            match (call.target.as_deref(), call.func_name.as_str(), args.len()) {
                (None, operators::EQUALS, 2) => Fast::Eq(arg(0)?, arg(1)?, true),
                (None, operators::NOT_EQUALS, 2) => Fast::Eq(arg(0)?, arg(1)?, false),
                (None, operators::LOGICAL_AND, 2) => Fast::And(arg(0)?, arg(1)?),
                (None, operators::LOGICAL_OR, 2) => Fast::Or(arg(0)?, arg(1)?),
                (None, operators::LOGICAL_NOT, 1) => Fast::Not(arg(0)?),
                (None, operators::INDEX, 2) => Fast::Index(arg(0)?, arg(1)?),
                (None, operators::IN, 2) => Fast::In(arg(0)?, arg(1)?),
                (Some(t), "startsWith", 1) => {
                    Fast::Str(StrFn::StartsWith, Box::new(compile(t)?), arg(0)?)
                }
                (Some(t), "endsWith", 1) => {
                    Fast::Str(StrFn::EndsWith, Box::new(compile(t)?), arg(0)?)
                }
                (Some(t), "contains", 1) => {
                    Fast::Str(StrFn::Contains, Box::new(compile(t)?), arg(0)?)
                }
                (Some(t), "lowerAscii", 0) => Fast::Lower(Box::new(compile(t)?)),
                (Some(t), "split", 1) => Fast::Split(Box::new(compile(t)?), arg(0)?),
                _ => return None,
            }
        }
        Expr::Comprehension(c) => quantifier(c)?,
        _ => return None,
    })
}

/// The `exists` and `all` macros, recognised by the exact shape the parser expands them
/// to (accumulator `@result` starting `false` folded with `||`, or `true` with `&&`).
fn quantifier(c: &ComprehensionExpr) -> Option<Fast> {
    if c.iter_var2.is_some() || c.iter_var.starts_with('@') {
        return None;
    }
    let Expr::Literal(LiteralValue::Boolean(init)) = &c.accu_init.expr else {
        return None;
    };
    let exists = !*init.inner();
    let Expr::Call(step) = &c.loop_step.expr else {
        return None;
    };
    let fold = if exists {
        operators::LOGICAL_OR
    } else {
        operators::LOGICAL_AND
    };
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(n) if *n == c.accu_var);
    if step.target.is_some()
        || step.func_name != fold
        || step.args.len() != 2
        || !is_accu(&step.args[0])
        || !is_accu(&c.result)
    {
        return None;
    }
    Some(Fast::Quantifier {
        exists,
        range: Box::new(compile(&c.iter_range)?),
        var: c.iter_var.clone(),
        pred: Box::new(compile(&step.args[1])?),
    })
}

/// Loop variables in scope, innermost last.
type Locals<'a> = Vec<(&'a str, Value)>;

/// What an attribute path names: a value, or a record not yet needed as a map.
enum Node<'a> {
    Val(Cow<'a, Value>),
    Rec(&'a Record),
}

impl<'a> Node<'a> {
    fn of(a: &'a Attr) -> Self {
        match a {
            Attr::Value(v) => Node::Val(Cow::Borrowed(v)),
            Attr::Record(r) => Node::Rec(r),
        }
    }

    fn into_value(self) -> Cow<'a, Value> {
        match self {
            Node::Val(v) => v,
            Node::Rec(r) => Cow::Borrowed(r.value()),
        }
    }

    /// `self.key` / `self[key]`: a record's field or a map's entry.
    fn member(self, key: &Key) -> Option<Self> {
        Some(match self {
            Node::Rec(r) => Node::of(r.get(key_str(key)?)?),
            Node::Val(Cow::Borrowed(Value::Map(m))) => Node::Val(Cow::Borrowed(m.map.get(key)?)),
            Node::Val(Cow::Owned(Value::Map(m))) => Node::Val(Cow::Owned(m.map.get(key)?.clone())),
            Node::Val(_) => return None,
        })
    }
}

impl Fast {
    /// Variables and member paths on records are resolved here without building maps;
    /// everything else is [`Fast::eval`].
    fn node<'a>(
        &'a self,
        vars: &'a [(&'static str, Attr)],
        locals: &mut Locals<'a>,
    ) -> Option<Node<'a>> {
        Some(match self {
            Fast::Var(name) => {
                if let Some((_, v)) = locals.iter().rev().find(|(n, _)| n == name) {
                    Node::Val(Cow::Owned(v.clone()))
                } else {
                    Node::of(&vars.iter().find(|(n, _)| n == name)?.1)
                }
            }
            Fast::Select(operand, key) => operand.node(vars, locals)?.member(key)?,
            Fast::Index(operand, index) => {
                let key = match index.eval(vars, locals)?.as_ref() {
                    Value::String(s) => Key::String(s.clone()),
                    _ => return None,
                };
                operand.node(vars, locals)?.member(&key)?
            }
            other => Node::Val(other.eval(vars, locals)?),
        })
    }

    /// The value, or `None`: let the interpreter decide.
    pub(super) fn eval<'a>(
        &'a self,
        vars: &'a [(&'static str, Attr)],
        locals: &mut Locals<'a>,
    ) -> Option<Cow<'a, Value>> {
        Some(match self {
            Fast::Lit(v) => Cow::Borrowed(v),
            Fast::Var(_) | Fast::Select(..) | Fast::Index(..) => {
                self.node(vars, locals)?.into_value()
            }
            Fast::Has(operand, key) => match operand.node(vars, locals)? {
                Node::Rec(r) => Cow::Owned(Value::Bool(r.get(key_str(key)?).is_some())),
                Node::Val(v) => match v.as_ref() {
                    Value::Map(m) => Cow::Owned(Value::Bool(m.map.contains_key(key))),
                    _ => return None,
                },
            },
            Fast::Eq(a, b, want) => {
                let a = a.eval(vars, locals)?;
                let b = b.eval(vars, locals)?;
                Cow::Owned(Value::Bool(plain_eq(&a, &b)? == *want))
            }
            Fast::And(a, b) => match a.eval(vars, locals)?.as_ref() {
                Value::Bool(false) => Cow::Owned(Value::Bool(false)),
                Value::Bool(true) => match b.eval(vars, locals)?.as_ref() {
                    Value::Bool(r) => Cow::Owned(Value::Bool(*r)),
                    _ => return None,
                },
                _ => return None,
            },
            Fast::Or(a, b) => match a.eval(vars, locals)?.as_ref() {
                Value::Bool(true) => Cow::Owned(Value::Bool(true)),
                Value::Bool(false) => match b.eval(vars, locals)?.as_ref() {
                    Value::Bool(r) => Cow::Owned(Value::Bool(*r)),
                    _ => return None,
                },
                _ => return None,
            },
            Fast::Not(a) => match a.eval(vars, locals)?.as_ref() {
                Value::Bool(b) => Cow::Owned(Value::Bool(!b)),
                _ => return None,
            },
            Fast::In(elem, list) => {
                let elem = elem.eval(vars, locals)?;
                let list = list.eval(vars, locals)?;
                let Value::List(items) = list.as_ref() else {
                    return None;
                };
                let mut found = false;
                for item in items.iter() {
                    if plain_eq(&elem, item)? {
                        found = true;
                        break;
                    }
                }
                Cow::Owned(Value::Bool(found))
            }
            Fast::Str(f, target, arg) => {
                let t = target.eval(vars, locals)?;
                let a = arg.eval(vars, locals)?;
                let (Value::String(t), Value::String(a)) = (t.as_ref(), a.as_ref()) else {
                    return None;
                };
                Cow::Owned(Value::Bool(match f {
                    StrFn::StartsWith => t.starts_with(a.as_str()),
                    StrFn::EndsWith => t.ends_with(a.as_str()),
                    StrFn::Contains => t.contains(a.as_str()),
                }))
            }
            Fast::Lower(target) => match target.eval(vars, locals)?.as_ref() {
                Value::String(s) => Cow::Owned(Value::String(Arc::new(s.to_ascii_lowercase()))),
                _ => return None,
            },
            Fast::Split(target, sep) => {
                let t = target.eval(vars, locals)?;
                let s = sep.eval(vars, locals)?;
                let (Value::String(t), Value::String(s)) = (t.as_ref(), s.as_ref()) else {
                    return None;
                };
                // An empty separator splits between code points: the interpreter's.
                if s.is_empty() {
                    return None;
                }
                Cow::Owned(Value::List(Arc::new(
                    t.split(s.as_str())
                        .map(|p| Value::String(Arc::new(p.to_owned())))
                        .collect(),
                )))
            }
            Fast::Quantifier {
                exists,
                range,
                var,
                pred,
            } => {
                // `s.split(sep).exists(g, g == "x")` (and `all` with `!=`): the parts are
                // compared where they lie, without building the list.
                if let (Fast::Split(target, sep), Some((literal, eq))) =
                    (range.as_ref(), var_vs_literal(pred, var))
                {
                    let t = target.eval(vars, locals)?;
                    let s = sep.eval(vars, locals)?;
                    if let (Value::String(t), Value::String(s)) = (t.as_ref(), s.as_ref()) {
                        if !s.is_empty() {
                            let hit = |p: &str| (p == literal) == eq;
                            let verdict = if *exists {
                                t.split(s.as_str()).any(hit)
                            } else {
                                t.split(s.as_str()).all(hit)
                            };
                            return Some(Cow::Owned(Value::Bool(verdict)));
                        }
                    }
                    return None;
                }
                let range = range.eval(vars, locals)?;
                let Value::List(items) = range.as_ref() else {
                    return None;
                };
                let mut verdict = !*exists;
                for item in items.iter() {
                    locals.push((var.as_str(), item.clone()));
                    let r = pred.eval(vars, locals).map(|v| match v.as_ref() {
                        Value::Bool(b) => Some(*b),
                        _ => None,
                    });
                    locals.pop();
                    // Any error or non-bool: CEL may still absorb it; the interpreter
                    // decides.
                    let b = r.flatten()?;
                    if b == *exists {
                        verdict = *exists;
                        break;
                    }
                }
                Cow::Owned(Value::Bool(verdict))
            }
        })
    }
}

/// A field name: records have string keys only.
fn key_str(key: &Key) -> Option<&str> {
    match key {
        Key::String(s) => Some(s.as_str()),
        _ => None,
    }
}

/// `var == "lit"` / `"lit" == var` (`true`) or `!=` (`false`): the literal.
fn var_vs_literal<'a>(pred: &'a Fast, var: &str) -> Option<(&'a str, bool)> {
    let Fast::Eq(a, b, eq) = pred else {
        return None;
    };
    match (a.as_ref(), b.as_ref()) {
        (Fast::Var(v), Fast::Lit(Value::String(l)))
        | (Fast::Lit(Value::String(l)), Fast::Var(v))
            if v == var =>
        {
            Some((l.as_str(), *eq))
        }
        _ => None,
    }
}

/// Equality where it is plain: two strings, bools, ints, uints or nulls. Anything else
/// (mixed numeric types, lists, maps, doubles): `None`.
fn plain_eq(a: &Value, b: &Value) -> Option<bool> {
    Some(match (a, b) {
        (Value::String(a), Value::String(b)) => a == b,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        (Value::UInt(a), Value::UInt(b)) => a == b,
        (Value::Null, Value::Null) => true,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::super::{map, string, Attr, Attrs, Expr, Record};
    use super::*;
    use proptest::prelude::*;

    /// How an activation's variables are represented; every form must read the same.
    #[derive(Debug, Clone, Copy)]
    enum Form {
        /// CEL maps throughout.
        Maps,
        /// Records, nested maps included ([`Record::from_value`]).
        Records,
        /// As the gateway builds them: `request` a [`Record::new`] of values (its headers a
        /// CEL map), `auth` a record around the identity's record.
        Gateway,
    }

    const FORMS: [Form; 3] = [Form::Maps, Form::Records, Form::Gateway];

    fn activation_in(
        form: Form,
        path: &str,
        groups: &str,
        tier: Option<&str>,
        header: &str,
    ) -> Attrs {
        let mut identity = vec![
            ("userid", string("user-1")),
            ("groups", string(groups)),
            (
                "roles",
                Value::List(Arc::new(vec![string("reader"), string("admin-ops")])),
            ),
            ("n", Value::Int(5)),
            ("u", Value::UInt(5)),
            ("flag", Value::Bool(true)),
        ];
        if let Some(t) = tier {
            identity.push(("tier", string(t)));
        }
        let request = vec![
            ("path", string(path)),
            ("method", string("POST")),
            ("model", string("gpt-4o-mini")),
            ("headers", map([("x-tier", string(header))])),
            ("query", map([("x", string("1"))])),
        ];
        let auth = map([("identity", map(identity.clone()))]);
        let source = map([("port", Value::Int(4242))]);
        let record = |v: &Value| Record::from_value(v).unwrap();
        let mut a = Attrs::new();
        match form {
            Form::Maps => {
                a.set("request", map(request));
                a.set("auth", auth);
                a.set("source", source);
            }
            Form::Records => {
                a.set("request", record(&map(request)));
                a.set("auth", record(&auth));
                a.set("source", record(&source));
            }
            Form::Gateway => {
                a.set("request", Record::new(request));
                a.set(
                    "auth",
                    Record::new([("identity", Attr::Record(record(&map(identity))))]),
                );
                a.set("source", Record::new([("port", Value::Int(4242))]));
            }
        }
        a
    }

    /// Expressions the direct evaluator must take, and answer itself on an activation
    /// that has every attribute they read.
    const DIRECT: &[&str] = &[
        r#"request.path == "/v1/chat/completions""#,
        r#"request.path != "/v1/chat/completions""#,
        r#"auth.identity.groups.split(",").exists(g, g == "free")"#,
        r#"auth.identity.groups.split(",").all(g, g != "banned")"#,
        "auth.identity.userid",
        r#"request.headers["x-tier"] == "gold""#,
        r#"has(auth.identity.tier)"#,
        r#""admin-ops" in auth.identity.roles"#,
        r#"request.path.startsWith("/v1/") && !request.path.endsWith("/models")"#,
        r#"request.model.contains("gpt") || request.path == "/x""#,
        r#"request.method.lowerAscii() == "post""#,
        "auth.identity.n == 5",
        "auth.identity.u == 5u",
        "auth.identity.flag",
        "!auth.identity.flag",
        "source.port == 4242",
        "auth.identity.roles",
        "request.headers",
        r#"auth.identity.roles.exists(r, r.startsWith("adm"))"#,
        r#"auth.identity.roles.exists(g, auth.identity.groups.split(",").exists(g, g == "gold"))"#,
        r#"request.query.x == "1""#,
        "null == null",
        "has(request.model)",
        "has(request.nothing)",
        "has(request.query.x)",
        r#"request["path"] == "/v1/chat/completions""#,
        r#"auth.identity["userid"]"#,
        "auth.identity",
        "request.query",
    ];

    /// Expressions it steps aside for (compiled or not): the interpreter answers.
    const OTHER: &[&str] = &[
        r#"has(auth.identity.tier) && auth.identity.tier == "gold""#,
        r#"auth.identity.missing == "x""#,
        "auth.identity.n == 5u",
        "auth.identity.n == 5.0",
        r#"auth.identity.groups.split("")"#,
        r#"request.path == "/a" || auth.identity.missing == "x""#,
        r#"auth.identity.missing == "x" || request.path == "/v1/chat/completions""#,
        r#"auth.identity.missing == "x" && request.path == "/nope""#,
        "[1, 2].exists(x, x == 2)",
        "size(request.path) > 3",
        "auth.identity.groups.split(\",\").exists(g, g.size() > 3)",
        "request.path.missing",
        "nothing_here",
        r#"request.headers["absent"] == "1""#,
        "auth.identity.n",
        r#"auth.identity.roles.exists(r, r == 1)"#,
        r#"1 in auth.identity.roles"#,
        r#""a" in request.headers"#,
        "request.path > \"a\"",
        "auth.identity.flag ? 1 : 2",
        r#""path" in request"#,
        "auth.identity.userid.missing",
        r#"request["nothing"] == "x""#,
        "size(auth.identity) > 2",
        "request == request",
    ];

    fn same(source: &str, a: &Attrs) {
        let e = Expr::compile(source).unwrap();
        let fast = e.eval(a);
        let slow = e.interpret(a);
        assert_eq!(fast, slow, "{source}");
    }

    #[test]
    fn direct_answers_equal_the_interpreter() {
        for form in FORMS {
            direct_answers_equal_the_interpreter_in(form);
        }
    }

    fn direct_answers_equal_the_interpreter_in(form: Form) {
        let a = activation_in(
            form,
            "/v1/chat/completions",
            "free,gold",
            Some("gold"),
            "gold",
        );
        for source in DIRECT {
            let e = Expr::compile(source).unwrap();
            assert!(
                e.is_direct(),
                "not compiled for the direct evaluator: {source}"
            );
            let direct = e
                .eval_direct(&a)
                .unwrap_or_else(|| panic!("stepped aside: {source} ({form:?})"));
            assert_eq!(Ok(direct), e.interpret(&a), "{source} ({form:?})");
        }
    }

    #[test]
    fn everything_else_is_the_interpreters() {
        for form in FORMS {
            for a in [
                activation_in(
                    form,
                    "/v1/chat/completions",
                    "free,gold",
                    Some("gold"),
                    "gold",
                ),
                activation_in(form, "/v1/models", "", None, ""),
                activation_in(form, "/", ",,", Some(""), "x"),
            ] {
                for source in DIRECT.iter().chain(OTHER) {
                    same(source, &a);
                }
            }
        }
        // A missing variable is the interpreter's error, word for word.
        let e = Expr::compile("auth.identity.userid").unwrap();
        let empty = Attrs::new();
        assert_eq!(e.eval(&empty), e.interpret(&empty));
        assert!(e.eval(&empty).is_err());
    }

    proptest! {
        #[test]
        fn direct_equals_interpreter_on_any_strings(
            path in "[/a-z0-9.,%]{0,24}",
            groups in "[a-z,]{0,20}",
            tier in proptest::option::of("[a-z]{0,6}"),
            header in "[a-zA-Z ,]{0,10}",
        ) {
            for form in FORMS {
                let a = activation_in(form, &path, &groups, tier.as_deref(), &header);
                for source in DIRECT.iter().chain(OTHER) {
                    let e = Expr::compile(source).unwrap();
                    prop_assert_eq!(e.eval(&a), e.interpret(&a), "{} ({:?})", source, form);
                }
            }
        }
    }
}
