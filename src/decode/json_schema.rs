//! JSON Schema writer schemas: the payload of a framed value (see [`super::framed`])
//! is JSON text, which must be valid under its schema. The value is then read as any
//! JSON value is, so a mapping moves from plain JSON unchanged.

use std::fmt;

use serde_json::Value;

use super::framed::Referenced;

/// The base URI of a schema without an `$id`, against which a reference's relative name
/// resolves (the validator's default).
const ROOT: &str = "json-schema:///";

/// A JSON Schema, compiled.
pub struct JsonSchema {
    validator: jsonschema::Validator,
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
        let mut options = jsonschema::options();
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
        Ok(Self { validator })
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
    }
}
