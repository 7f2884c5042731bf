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
        // A backreference needs a backtracking engine, which is not used.
        assert!(JsonSchema::parse(r#"{"pattern": "^(a+)+\\1$"}"#, &[]).is_err());
    }
}
