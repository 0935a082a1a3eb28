//! The OpenAPI 3 document of the admin API's REST side, generated from the same descriptors the
//! REST side is served from ([`rest::bindings`](crate::admin::rest::bindings)), so it cannot
//! drift from the proto: every RPC is an operation, every field a property with its proto3 JSON
//! name and type, every comment a description. Served at [`PATH`].

use prost_reflect::{DescriptorPool, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::admin::rest::{Binding, MAX_BODY_BYTES, bindings};

/// Where the document is served on the admin port.
pub const PATH: &str = "/v1/openapi.json";

/// The document.
pub fn document(pool: &DescriptorPool) -> Value {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    for b in bindings(pool) {
        let op = operation(&b, &mut schemas);
        let entry = paths
            .entry(b.path.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[b.method.as_str().to_ascii_lowercase()] = op;
    }
    schemas.insert("Problem".into(), problem_schema());
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tollgate admin API",
            "version": "v1",
            "description": format!(
                "API keys, their limits and their usage. Generated from \
                 proto/tollgate/admin/v1/admin.proto; the same RPCs are served over gRPC on this \
                 port. proto3 JSON mapping: lowerCamelCase names, 64-bit integers as strings, \
                 times in RFC 3339. Request bodies are at most {MAX_BODY_BYTES} bytes; unknown \
                 fields are refused."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token whose SHA-256 is in admin.token_sha256.",
                },
            },
            "schemas": schemas,
        },
    })
}

fn operation(b: &Binding, schemas: &mut Map<String, Value>) -> Value {
    let rpc = &b.rpc;
    let mut parameters = Vec::new();
    for f in b.path_fields() {
        parameters.push(json!({
            "name": f.name(),
            "in": "path",
            "required": true,
            "schema": parameter_schema(f),
        }));
    }
    for f in b.query_fields() {
        let mut p = json!({
            "name": f.json_name(),
            "in": "query",
            "required": false,
            "schema": parameter_schema(&f),
        });
        if let Some(d) = field_comment(&f) {
            p["description"] = d.into();
        }
        parameters.push(p);
    }
    let output = rpc.output();
    message_schema(&output, schemas);
    let mut op = json!({
        "operationId": rpc.name(),
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": reference(&output)}},
            },
            "default": {
                "description": "An error: 400 invalid argument, 401 no valid credentials, 404 \
                                no such key or identity, 413 body too large, 415 not JSON, \
                                503 database unavailable.",
                "content": {
                    "application/problem+json": {
                        "schema": {"$ref": "#/components/schemas/Problem"}
                    }
                },
            },
        },
    });
    if let Some(text) = comment(&rpc.parent_file(), rpc.path()) {
        op["summary"] = text.lines().next().unwrap_or_default().into();
        op["description"] = text.into();
    }
    if b.body {
        let input = rpc.input();
        let skip: Vec<u32> = b.path_fields().map(|f| f.number()).collect();
        let body = object_schema(&input, &skip, schemas);
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": body}},
        });
    }
    op
}

fn reference(m: &MessageDescriptor) -> Value {
    json!({"$ref": format!("#/components/schemas/{}", m.name())})
}

/// Registers `m` (and what it holds) in `schemas`, once.
fn message_schema(m: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    if schemas.contains_key(m.name()) {
        return;
    }
    schemas.insert(m.name().to_string(), Value::Null);
    let schema = object_schema(m, &[], schemas);
    schemas.insert(m.name().to_string(), schema);
}

/// `m`'s fields (less those numbered in `skip`) as an object that takes no other property.
fn object_schema(m: &MessageDescriptor, skip: &[u32], schemas: &mut Map<String, Value>) -> Value {
    let mut properties = Map::new();
    for f in m.fields().filter(|f| !skip.contains(&f.number())) {
        let mut s = field_schema(&f, schemas);
        if let Some(d) = field_comment(&f) {
            // A `$ref` takes no siblings in OpenAPI 3.0: describe it through `allOf`.
            if s.get("$ref").is_some() {
                s = json!({"allOf": [s]});
            }
            s["description"] = d.into();
        }
        properties.insert(f.json_name().to_string(), s);
    }
    let mut schema = json!({
        "type": "object",
        "properties": properties,
        "additionalProperties": false,
    });
    if let Some(d) = comment(&m.parent_file(), m.path()) {
        schema["description"] = d.into();
    }
    schema
}

fn field_schema(f: &FieldDescriptor, schemas: &mut Map<String, Value>) -> Value {
    if f.is_map() {
        // A map is a JSON object of its values, keyed by the map's keys as strings.
        if let Kind::Message(entry) = f.kind() {
            let value = entry.map_entry_value_field();
            return json!({
                "type": "object",
                "additionalProperties": kind_schema(&value.kind(), schemas),
            });
        }
    }
    let one = kind_schema(&f.kind(), schemas);
    if f.is_list() {
        json!({"type": "array", "items": one})
    } else {
        one
    }
}

/// A value of `kind` in proto3 JSON.
fn kind_schema(kind: &Kind, schemas: &mut Map<String, Value>) -> Value {
    match kind {
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]{1,19}$"})
        }
        Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "uint64", "pattern": "^[0-9]{1,20}$"})
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
        }
        Kind::Bool => json!({"type": "boolean"}),
        Kind::String => json!({"type": "string"}),
        Kind::Bytes => json!({"type": "string", "format": "byte"}),
        Kind::Double | Kind::Float => json!({"type": "number"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_string()).collect::<Vec<_>>()})
        }
        Kind::Message(m) => match m.full_name() {
            "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
            "google.protobuf.Duration" => json!({
                "type": "string",
                "pattern": "^[0-9]{1,12}(\\.[0-9]{1,9})?s$",
                "description": "Seconds, with an s: \"3600s\", \"0.5s\".",
            }),
            "google.protobuf.FieldMask" => json!({
                "type": "string",
                "description": "Comma-separated lowerCamelCase field paths.",
            }),
            _ => {
                message_schema(m, schemas);
                reference(m)
            }
        },
    }
}

/// A path or query parameter: its text is a plain integer, string or enum name.
fn parameter_schema(f: &FieldDescriptor) -> Value {
    match f.kind() {
        Kind::Int64 => {
            json!({"type": "integer", "format": "int64", "minimum": i64::MIN, "maximum": i64::MAX})
        }
        Kind::Int32 => {
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        }
        other => kind_schema(&other, &mut Map::new()),
    }
}

fn field_comment(f: &FieldDescriptor) -> Option<String> {
    comment(&f.parent_file(), f.path())
}

/// The leading comment of what is at `path` in `file`, tidied.
fn comment(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let text = text
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string();
    (!text.is_empty()).then_some(text)
}

fn problem_schema() -> Value {
    let string = || json!({"type": "string"});
    json!({
        "type": "object",
        "description": "An RFC 9457 problem, with error and message as Check's denials have them.",
        "required": ["type", "title", "status", "detail", "error", "message"],
        "properties": {
            "type": string(),
            "title": string(),
            "status": {"type": "integer"},
            "detail": string(),
            "error": {"type": "string", "description": "The gRPC code's name: not_found, invalid_argument, …"},
            "message": string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::pb;

    /// The document names every RPC at its path and method, and every field of every message
    /// the RPCs take or give by its JSON name; so a field added to the proto without its
    /// schema, or an RPC without its operation, fails here.
    #[test]
    fn the_document_covers_the_proto() {
        let pool = pb::descriptor_pool();
        let doc = document(pool);
        let service = pool
            .get_service_by_name("tollgate.admin.v1.AdminService")
            .unwrap();
        let http = pool.get_extension_by_name("google.api.http").unwrap();
        let schemas = &doc["components"]["schemas"];
        for rpc in service.methods() {
            let rule = rpc
                .options()
                .get_extension(&http)
                .as_message()
                .unwrap()
                .clone();
            let (method, path) = ["get", "post", "patch", "put", "delete"]
                .into_iter()
                .find(|m| rule.has_field_by_name(m))
                .map(|m| {
                    (
                        m,
                        rule.get_field_by_name(m)
                            .unwrap()
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                })
                .unwrap();
            let op = &doc["paths"][&path][method];
            assert_eq!(op["operationId"], rpc.name(), "{method} {path}");
            assert_eq!(
                op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
                format!("#/components/schemas/{}", rpc.output().name())
            );
            // Every request field is a path parameter, a query parameter or a body property.
            for f in rpc.input().fields() {
                let in_params = op["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == f.json_name() || p["name"] == f.name());
                let in_body =
                    op["requestBody"]["content"]["application/json"]["schema"]["properties"]
                        .get(f.json_name())
                        .is_some();
                assert!(in_params ^ in_body, "{}.{}", rpc.name(), f.name());
            }
            let mut messages = vec![rpc.output()];
            while let Some(m) = messages.pop() {
                let schema = &schemas[m.name()];
                assert_eq!(schema["additionalProperties"], false, "{}", m.name());
                for f in m.fields() {
                    assert!(
                        schema["properties"].get(f.json_name()).is_some(),
                        "{}.{} as {}",
                        m.name(),
                        f.name(),
                        f.json_name()
                    );
                    if let Kind::Message(inner) = f.kind()
                        && inner.package_name() == "tollgate.admin.v1"
                        && !inner.is_map_entry()
                    {
                        messages.push(inner);
                    }
                }
            }
        }
        assert_eq!(
            doc["paths"]
                .as_object()
                .unwrap()
                .values()
                .map(|p| p.as_object().unwrap().len())
                .sum::<usize>(),
            service.methods().len()
        );
        // proto3 JSON: int64 as strings, lowerCamelCase.
        assert_eq!(schemas["Key"]["properties"]["id"]["type"], "string");
        assert!(
            schemas["Key"]["properties"]
                .get("effectivePerMinute")
                .is_some()
        );
        assert!(schemas["Limits"]["properties"].get("refund5xx").is_some());
        assert_eq!(
            schemas["Key"]["properties"]["expiresAt"]["format"],
            "date-time"
        );
        assert!(
            doc["paths"]["/v1/keys/{id}"]["get"]["summary"]
                .as_str()
                .unwrap()
                .contains("never its secret")
        );
    }
}
