//! The OpenAPI 3.1 document of the push API, served at
//! `GET /api/openapi.json` without an API key. It is a JSON file kept beside
//! the code; the tests below hold it to [`Method::ALL`] (the list the router
//! is built from), and an end-to-end test calls every path it names.

use axum::http::header;
use axum::response::IntoResponse;

#[cfg(test)]
use crate::methods::Method;

pub(crate) const DOCUMENT: &str = include_str!("openapi.json");

pub(crate) async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// Follows a local `$ref` ("#/components/...").
    fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.strip_prefix('#').expect("a local $ref");
                document
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("{reference} points nowhere"))
            }
            None => value,
        }
    }

    #[test]
    fn the_document_names_every_method_and_nothing_else() {
        let document = document();
        assert_eq!(document["openapi"], "3.1.0");
        let documented: BTreeSet<String> = document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, item)| item.get("post").is_some())
            .map(|(path, _)| path.clone())
            .collect();
        let routed: BTreeSet<String> = Method::ALL
            .iter()
            .map(|(_, name)| format!("/api/{name}"))
            .collect();
        assert_eq!(documented, routed, "paths of the document vs routes");
    }

    #[test]
    fn every_method_has_request_and_response_schemas() {
        let document = document();
        for (_, name) in Method::ALL {
            let operation = &document["paths"][format!("/api/{name}")]["post"];
            let request = &operation["requestBody"]["content"]["application/json"]["schema"];
            let request = resolve(&document, request);
            assert_eq!(request["type"], "object", "{name}: request schema");
            let ok = &operation["responses"]["200"]["content"]["application/json"]["schema"];
            let result = resolve(&document, &ok["properties"]["result"]);
            assert_eq!(result["type"], "object", "{name}: result schema");
            for status in ["400", "401", "413", "429"] {
                let response = resolve(&document, &operation["responses"][status]);
                let error = resolve(
                    &document,
                    &response["content"]["application/json"]["schema"],
                );
                assert!(
                    error["properties"]["error"].is_object(),
                    "{name}: {status} has the error schema"
                );
            }
        }
    }

    #[test]
    fn every_reference_resolves_and_batch_lists_the_other_methods() {
        let document = document();
        fn walk(document: &Value, value: &Value) {
            match value {
                Value::Object(map) => {
                    if map.contains_key("$ref") {
                        resolve(document, value);
                    }
                    map.values().for_each(|child| walk(document, child));
                }
                Value::Array(items) => items.iter().for_each(|child| walk(document, child)),
                _ => {}
            }
        }
        walk(&document, &document);
        let in_batch: BTreeSet<&str> = document
            .pointer(
                "/components/schemas/BatchParams/properties/commands/items/properties/method/enum",
            )
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap())
            .collect();
        let expected: BTreeSet<&str> = Method::ALL
            .iter()
            .filter(|(method, _)| *method != Method::Batch)
            .map(|(_, name)| *name)
            .collect();
        assert_eq!(in_batch, expected);
    }
}
