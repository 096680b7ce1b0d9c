//! flanneld decodes its JSON with Go's encoding/json, which matches object keys to fields without regard to case:
//! `"Directrouting": true` and `"vni": 7` take effect there. Tartan decodes with the same rule, so a config copied
//! from a guide means the same thing under both: an exact-case key wins, otherwise a key equal to the field name
//! ignoring case is taken. Keys that match no field are returned, so the caller can say which were ignored.

use serde_json::{Map, Value};

/// `v`'s keys renamed to the `known` names they match (exact first, else ignoring ASCII case), and the keys that
/// match none. A value that is not an object is returned as it is.
pub fn fold_keys(v: &Value, known: &[&str]) -> (Value, Vec<String>) {
    let Value::Object(obj) = v else { return (v.clone(), Vec::new()) };
    let mut out = Map::new();
    let mut unknown = Vec::new();
    for (key, value) in obj {
        if known.contains(&key.as_str()) {
            // Exact: always wins.
            out.insert(key.clone(), value.clone());
        } else if let Some(name) = known.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            // Folded: only where no exact-case key gives the field its value.
            if !obj.contains_key(*name) {
                out.insert(name.to_string(), value.clone());
            }
        } else {
            unknown.push(key.clone());
        }
    }
    (Value::Object(out), unknown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn case_is_ignored_exact_wins_unknown_is_reported() {
        let (v, unknown) = fold_keys(&json!({"vni": 7, "Directrouting": true, "Typo": 1}), &["VNI", "DirectRouting"]);
        assert_eq!(v, json!({"VNI": 7, "DirectRouting": true}));
        assert_eq!(unknown, ["Typo"]);
        let (v, _) = fold_keys(&json!({"vni": 7, "VNI": 9}), &["VNI"]);
        assert_eq!(v, json!({"VNI": 9}), "the exact-case key wins whatever the order");
        assert_eq!(fold_keys(&json!(3), &["VNI"]).0, json!(3));
    }
}
