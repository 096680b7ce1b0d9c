//! Label selectors: a Service's `selector` (equality on every label) and the LabelSelector of NetworkPolicy
//! (matchLabels ANDed with matchExpressions).

use serde::{Deserialize, Serialize};

use crate::objects::{LabelSelector, Labels};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator.as_str() {
            "In" => v.is_some_and(|v| self.values.contains(v)),
            // As Kubernetes: a missing key satisfies NotIn.
            "NotIn" => v.is_none_or(|v| !self.values.contains(v)),
            "Exists" => v.is_some(),
            "DoesNotExist" => v.is_none(),
            // Validation rejects other operators; an unknown one matches nothing rather than everything.
            _ => false,
        }
    }
}

/// Whether `labels` satisfy `sel`. The empty selector matches everything.
pub fn matches(sel: &LabelSelector, labels: &Labels) -> bool {
    sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|r| r.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> Requirement {
        Requirement { key: key.into(), operator: op.into(), values: values.iter().map(|v| v.to_string()).collect() }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let pod = labels(&[("app", "redis"), ("role", "leader")]);
        assert!(matches(&LabelSelector::default(), &pod), "empty selects all");
        let mut sel = LabelSelector { match_labels: labels(&[("app", "redis")]), match_expressions: vec![] };
        assert!(matches(&sel, &pod));
        sel.match_expressions.push(req("role", "In", &["leader", "primary"]));
        assert!(matches(&sel, &pod));
        sel.match_expressions.push(req("tier", "DoesNotExist", &[]));
        assert!(matches(&sel, &pod));
        sel.match_expressions.push(req("role", "NotIn", &["leader"]));
        assert!(!matches(&sel, &pod));
    }

    #[test]
    fn operators() {
        let pod = labels(&[("env", "prod")]);
        assert!(req("env", "Exists", &[]).matches(&pod));
        assert!(!req("tier", "Exists", &[]).matches(&pod));
        assert!(req("tier", "NotIn", &["x"]).matches(&pod), "a missing key is not in any set");
        assert!(!req("tier", "In", &["x"]).matches(&pod));
        assert!(!req("env", "Bogus", &["prod"]).matches(&pod));
    }
}
