//! `vmm/api/openapi.yaml` as a test oracle: every answer of the API is checked against it.
//! Shared by the API's unit tests (against a fake VM) and the end-to-end tests (against a real
//! one); the including module has `HttpResponse` and `OPENAPI_YAML` of `vmm::api` in scope.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use serde_json::{json, Value};

use super::{HttpResponse, OPENAPI_YAML};

pub struct OpenApi {
    /// The parsed document.
    pub doc: Value,
}

pub fn openapi() -> &'static OpenApi {
    static DOC: OnceLock<OpenApi> = OnceLock::new();
    DOC.get_or_init(|| OpenApi {
        doc: serde_yaml::from_str(OPENAPI_YAML).expect("openapi.yaml is valid YAML"),
    })
}

impl OpenApi {
    /// Every (METHOD, path) the document describes.
    pub fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
        ops
    }

    pub fn operation(&self, method: &str, path: &str) -> Option<&Value> {
        self.doc["paths"].get(path)?.get(method.to_lowercase())
    }

    /// Follows a local `$ref` (e.g. `#/components/responses/Conflict`).
    pub fn resolve<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.strip_prefix('#').expect("local $ref");
                self.doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {reference}"))
            }
            None => value,
        }
    }

    /// A validator of `schema`, whose `$ref`s resolve into the document's components.
    pub fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let document = json!({
            "components": self.doc["components"],
            "allOf": [schema],
        });
        jsonschema::draft4::options()
            .build(&document)
            .unwrap_or_else(|e| panic!("invalid schema {schema}: {e}"))
    }

    /// Checks `instance` against `schema`, returning the errors.
    pub fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        self.validator(schema)
            .iter_errors(instance)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect()
    }

    pub fn schema(&self, name: &str) -> Value {
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// Checks a response to `method path` against the document: the status must be listed
    /// for the operation, and the body must match its media type and schema. Paths and
    /// methods the document lacks must be answered 404 or 405 with an `Error` body.
    pub fn check(&self, method: &str, path: &str, response: &HttpResponse) {
        let status = response.status;
        let Some(operation) = self.operation(method, path) else {
            assert!(
                status == 404 || status == 405,
                "{method} {path} is not in openapi.yaml but answered {status}"
            );
            self.check_json(&self.schema("Error"), response, method, path);
            return;
        };
        let listed = operation["responses"]
            .get(status.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "openapi.yaml lists no {status} response for {method} {path} (body {:?})",
                    String::from_utf8_lossy(&response.body)
                )
            });
        let listed = self.resolve(listed);
        let Some(content) = listed.get("content").and_then(Value::as_object) else {
            assert!(
                response.body.is_empty(),
                "{method} {path} {status}: the document says no body, got {:?}",
                String::from_utf8_lossy(&response.body)
            );
            return;
        };
        let content_type = response
            .header("content-type")
            .unwrap_or_else(|| panic!("{method} {path} {status}: no Content-Type"));
        let normalize = |s: &str| s.replace(' ', "").to_ascii_lowercase();
        let (media_type, media) = content
            .iter()
            .find(|(media_type, _)| normalize(media_type) == normalize(content_type))
            .unwrap_or_else(|| {
                panic!("{method} {path} {status}: Content-Type {content_type} is not documented")
            });
        if media_type == "application/json" {
            self.check_json(&media["schema"], response, method, path);
        } else {
            assert_eq!(media["schema"]["type"], "string");
            assert!(std::str::from_utf8(&response.body).is_ok());
        }
    }

    pub fn check_json(&self, schema: &Value, response: &HttpResponse, method: &str, path: &str) {
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        let body: Value = serde_json::from_slice(&response.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} {}: body is not JSON ({e}): {:?}",
                response.status,
                String::from_utf8_lossy(&response.body)
            )
        });
        let errors = self.errors(schema, &body);
        assert!(
            errors.is_empty(),
            "{method} {path} {}: {body} does not match {schema}: {errors:?}",
            response.status
        );
    }
}
