//! JSON Schema writer schemas: the payload of a framed value (see [`super::framed`])
//! is JSON text, which must be valid under its schema. The value is then read as any
//! JSON value is, so a mapping moves from plain JSON unchanged.

use std::fmt;

use serde_json::Value;

use super::framed::{Field, Referenced};
use crate::config::ColumnType;

/// The base URI of a schema without an `$id`, against which a reference's relative name
/// resolves (the validator's default).
const ROOT: &str = "json-schema:///";

/// A JSON Schema, compiled, and its text parsed.
pub struct JsonSchema {
    validator: jsonschema::Validator,
    schema: Value,
}

impl fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonSchema").finish_non_exhaustive()
    }
}

impl JsonSchema {
    /// Compiles a schema from its text and the schemas it references, each found under
    /// the name its `$ref` uses. Nothing is fetched: a reference to anything else
    /// refuses the schema.
    pub fn parse(text: &str, references: &[Referenced]) -> Result<Self, String> {
        let schema: Value =
            serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
        check_ref_paths(&schema)?;
        // Patterns in the regex crate's dialect (linear time, no look-around or
        // backreferences, which a schema using them is refused for): a backtracking
        // engine lets one hostile pattern cost seconds per string.
        let mut options =
            jsonschema::options().with_pattern_options(jsonschema::PatternOptions::regex());
        let registry;
        if !references.is_empty() {
            let mut builder = jsonschema::Registry::new();
            for reference in references {
                let contents: Value = serde_json::from_str(&reference.text).map_err(|e| {
                    format!("its reference {} is not JSON: {e}", reference.name)
                })?;
                let uri = if reference.name.contains(':') {
                    reference.name.clone()
                } else {
                    format!("{ROOT}{}", reference.name.trim_start_matches('/'))
                };
                builder = builder
                    .add(&uri, contents)
                    .map_err(|e| format!("its reference {}: {e}", reference.name))?;
            }
            registry = builder.prepare().map_err(|e| e.to_string())?;
            options = options.with_registry(&registry);
        }
        let validator = options.offline().build(&schema).map_err(|e| e.to_string())?;
        Ok(Self { validator, schema })
    }

    /// The properties of the object the schema describes, each with the column type of
    /// its JSON type (`["null", T]` is T or NULL; a string of format `date-time` or
    /// `date` is an instant or a date; a number `numeric`; anything else, or several
    /// types, `jsonb`).
    pub(super) fn fields(&self) -> Result<Vec<Field>, String> {
        let properties = self.schema["properties"]
            .as_object()
            .ok_or("the schema has no properties of an object")?;
        let required: Vec<&str> = self.schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        Ok(properties
            .iter()
            .map(|(name, property)| {
                let types: Vec<&str> = match &property["type"] {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                let nullable = types.contains(&"null");
                let kind: Vec<&str> = types.into_iter().filter(|t| *t != "null").collect();
                let kind = match (kind.as_slice(), property["format"].as_str()) {
                    (["string"], Some("date-time")) => ColumnType::Timestamptz,
                    (["string"], Some("date")) => ColumnType::Date,
                    (["string"], Some("uuid")) => ColumnType::Uuid,
                    (["string"], _) => ColumnType::Text,
                    (["integer"], _) => ColumnType::Int8,
                    // Exact: a float8 would round a long decimal.
                    (["number"], _) => ColumnType::Numeric,
                    (["boolean"], _) => ColumnType::Bool,
                    _ => ColumnType::Jsonb,
                };
                Field {
                    name: name.clone(),
                    json_name: None,
                    kind,
                    required: required.contains(&name.as_str()) && !nullable,
                }
            })
            .collect())
    }

    /// Whether `value` is valid under the schema; the first failure, and where, when not.
    pub(super) fn validate(&self, value: &Value) -> Result<(), String> {
        self.validator.validate(value).map_err(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("at {at}: {e}")
            }
        })
    }
}

/// The most ways validation may reach one subschema through `$ref`s: each way is walked
/// for every value, and the validator caches nothing.
const MAX_REF_PATHS: u64 = 10_000;

/// The most local `$ref`s a schema may hold.
const MAX_REFS: usize = 2_000;

/// Refuses a schema whose local `$ref`s (`#/...`) multiply: two refs to a definition that
/// holds two refs to the next, 40 times over, is a few kilobytes of schema and 2^40
/// evaluations per value. Counts, for each location, the ways to reach it from the root
/// through refs (a ref back into what refers to it, a recursive schema, counts once:
/// there the value's depth bounds the walk).
fn check_ref_paths(schema: &Value) -> Result<(), String> {
    // Every local ref: where it stands, and the location it points at.
    let mut refs: Vec<(String, String)> = Vec::new();
    collect_refs(schema, &mut String::new(), &mut refs);
    // Counting costs refs squared.
    if refs.len() > MAX_REFS {
        return Err(format!("it holds more than {MAX_REFS} $refs"));
    }
    // Ways to reach `location`, memoised; `visiting` breaks cycles.
    fn ways(
        location: &str,
        refs: &[(String, String)],
        memo: &mut std::collections::HashMap<String, u64>,
        visiting: &mut Vec<String>,
    ) -> u64 {
        if let Some(&n) = memo.get(location) {
            return n;
        }
        if visiting.iter().any(|v| v == location) {
            return 1;
        }
        visiting.push(location.to_owned());
        // Reached as part of the root's tree, and through each ref pointing at it or at
        // a location containing it.
        let mut n: u64 = 1;
        for (at, target) in refs {
            let inside = location == target
                || location.strip_prefix(target.as_str()).is_some_and(|r| r.starts_with('/'));
            if inside {
                n = n.saturating_add(ways(at, refs, memo, visiting));
            }
        }
        visiting.pop();
        memo.insert(location.to_owned(), n);
        n
    }
    let mut memo = std::collections::HashMap::new();
    for (_, target) in &refs {
        let n = ways(target, &refs, &mut memo, &mut Vec::new());
        if n > MAX_REF_PATHS {
            return Err(format!(
                "its $refs reach {target} in more than {MAX_REF_PATHS} ways, each walked for \
                 every value"
            ));
        }
    }
    Ok(())
}

/// Appends each local `$ref` under `value` (at JSON pointer `at`): where it stands, and
/// the pointer it names.
fn collect_refs(value: &Value, at: &mut String, refs: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            if let Some(target) = map.get("$ref").and_then(Value::as_str)
                && let Some(pointer) = target.strip_prefix('#')
            {
                refs.push((at.clone(), pointer.to_owned()));
            }
            for (key, inner) in map {
                let len = at.len();
                at.push('/');
                at.push_str(&key.replace('~', "~0").replace('/', "~1"));
                collect_refs(inner, at, refs);
                at.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                let len = at.len();
                at.push_str(&format!("/{i}"));
                collect_refs(inner, at, refs);
                at.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_are_checked_against_the_schema_and_its_references() {
        let reference = Referenced {
            name: "status.json".to_owned(),
            text: r#"{"type": "integer", "minimum": 100, "maximum": 599}"#.to_owned(),
        };
        let schema = JsonSchema::parse(
            r#"{"type": "object", "required": ["url"],
                "properties": {"url": {"type": "string"}, "status": {"$ref": "status.json"}}}"#,
            &[reference],
        )
        .expect("the schema compiles");
        assert!(schema.validate(&json!({"url": "u", "status": 200})).is_ok());
        let why = schema
            .validate(&json!({"url": "u", "status": 42}))
            .expect_err("below the referenced minimum");
        assert!(why.starts_with("at /status: ") && why.contains("42"), "{why}");
        let why = schema.validate(&json!({"status": 200})).expect_err("no url");
        assert!(why.contains("url"), "{why}");
    }

    #[test]
    fn schemas_that_would_fetch_are_refused() {
        for text in [
            r#"{"$ref": "https://example.com/schema.json"}"#,
            r#"{"$ref": "file:///etc/passwd"}"#,
            r#"{"$ref": "missing.json"}"#,
        ] {
            assert!(JsonSchema::parse(text, &[]).is_err(), "{text}");
        }
        assert!(JsonSchema::parse("{not json", &[]).is_err());
        // Refs that multiply: 40 levels of two refs to the next.
        let mut defs = serde_json::Map::new();
        for i in 0..40 {
            let next = format!("#/$defs/l{}", i + 1);
            defs.insert(
                format!("l{i}"),
                json!({"allOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert("l40".to_owned(), json!({"type": "integer"}));
        let dag = json!({"$ref": "#/$defs/l0", "$defs": defs}).to_string();
        let err = JsonSchema::parse(&dag, &[]).expect_err("2^40 ways");
        assert!(err.contains("ways"), "{err}");
        // A recursive schema (a tree) and ordinary shared definitions are fine.
        let tree = r##"{"$defs": {"node": {"type": "object", "properties": {
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}"##;
        JsonSchema::parse(tree, &[]).expect("a recursive schema");
        let shared = r##"{"$defs": {"id": {"type": "integer"}}, "properties": {
            "a": {"$ref": "#/$defs/id"}, "b": {"$ref": "#/$defs/id"}}}"##;
        JsonSchema::parse(shared, &[]).expect("shared definitions");
        // A backreference needs a backtracking engine, which is not used.
        assert!(JsonSchema::parse(r#"{"pattern": "^(a+)+\\1$"}"#, &[]).is_err());
    }
}
