//! OPA Rego authorization (Kuadrant AuthPolicy `authorization.*.opa.rego`), on the
//! `regorus` interpreter.
//!
//! Each rule is parsed and compiled once at config load (its own generated package,
//! entry point `allow`); a request evaluates the compiled policy with its input
//! (~13 µs for the tutorial's rule on this box, `cargo bench --bench rego`; an engine
//! clone per request was ~30 µs). Undefined `allow` (no rule body held) is a refusal, as
//! in OPA. The input mirrors Authorino's authorization JSON: `auth.identity`,
//! `context.request.http` (method, path, host, headers) and `request` (the same, flat).

use regorus::{CompiledPolicy, Engine, Value};

pub struct RegoRule {
    pub name: String,
    policy: CompiledPolicy,
}

impl RegoRule {
    /// Parse `rego` (rules without a package line). v1 syntax first (`allow if { … }`),
    /// then v0 (the tutorial's `allow { … }`): v1 refuses a body without `if`, while v0
    /// would read a v1 rule with another meaning.
    pub fn compile(index: usize, name: &str, rego: &str) -> Result<Self, String> {
        if rego.lines().any(|l| l.trim_start().starts_with("package ")) {
            return Err("give the rules only: a `package` line is added by tollgate".into());
        }
        let package = format!("tollgate.authz.r{index}");
        let source = format!("package {package}\n{rego}");
        let mut errors = Vec::new();
        for v0 in [false, true] {
            let mut engine = Engine::new();
            engine.set_rego_v0(v0);
            match engine.add_policy(format!("{name}.rego"), source.clone()) {
                Ok(_) => {
                    let entry = regorus::Rc::from(format!("data.{package}.allow").as_str());
                    return match engine.compile_with_entrypoint(&entry) {
                        Ok(policy) => Ok(Self {
                            name: name.to_owned(),
                            policy,
                        }),
                        Err(e) => Err(format!("Rego does not compile: {e}")),
                    };
                }
                Err(e) => errors.push(format!("as {}: {e}", if v0 { "v0" } else { "v1" })),
            }
        }
        Err(format!("Rego does not parse ({})", errors.join("; ")))
    }

    /// Does `allow` hold for this input?
    pub fn allows(&self, input: &serde_json::Value) -> Result<bool, String> {
        match self.policy.eval_with_input(Value::from(input.clone())) {
            Ok(v) => Ok(v == Value::from(true)),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const TUTORIAL: &str = r#"groups := split(object.get(input.auth.identity.metadata.annotations, "kuadrant.io/groups", ""), ",")
allow { groups[_] == "free" }
allow { groups[_] == "gold" }
"#;

    fn input(groups: Option<&str>) -> serde_json::Value {
        let annotations = match groups {
            Some(g) => json!({ "kuadrant.io/groups": g }),
            None => json!({}),
        };
        json!({ "auth": { "identity": { "metadata": { "annotations": annotations } } } })
    }

    #[test]
    fn tutorial_rule_allows_free_and_gold_only() {
        let r = RegoRule::compile(0, "allow-groups", TUTORIAL).unwrap();
        assert!(r.allows(&input(Some("free"))).unwrap());
        assert!(r.allows(&input(Some("bronze,gold"))).unwrap());
        assert!(!r.allows(&input(Some("bronze"))).unwrap());
        assert!(!r.allows(&input(None)).unwrap());
    }

    #[test]
    fn v1_syntax_and_errors() {
        let r = RegoRule::compile(1, "v1", "allow if { input.auth.identity.x == 1 }").unwrap();
        assert!(r.allows(&json!({"auth": {"identity": {"x": 1}}})).unwrap());
        assert!(!r.allows(&json!({"auth": {"identity": {"x": 2}}})).unwrap());
        let team = RegoRule::compile(
            4,
            "team",
            "allow if { input.auth.identity.team == \"red\" }\n",
        )
        .unwrap();
        assert!(team
            .allows(&json!({"auth": {"identity": {"team": "red"}}}))
            .unwrap());
        assert!(!team
            .allows(&json!({"auth": {"identity": {"team": "blue"}}}))
            .unwrap());
        assert!(RegoRule::compile(2, "bad", "allow {").is_err());
        assert!(RegoRule::compile(3, "pkg", "package x\nallow = true").is_err());
    }
}
