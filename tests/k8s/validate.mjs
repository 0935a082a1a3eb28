// Validates Kubernetes objects offline against the API schemas: kubernetes-models for the
// built-in kinds, @kubernetes-models/istio, /cert-manager and /gateway-api for theirs. Envoy
// Gateway's CRDs are in no registry package, so a SecurityPolicy is checked against the fields
// examples/envoy-gateway and the README rely on, as Envoy Gateway v1.9's API types define them
// (api/v1alpha1/ext_auth_types.go, securitypolicy_types.go), unknown fields refused.
//
//   node validate.mjs FILE...      (YAML, several documents each; "-" reads standard input)
//
// Prints one JSON line per object: {"file", "apiVersion", "kind", "name", "errors"} and exits 1
// when any object fails, or is of a kind nothing here can validate.
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import Ajv from "ajv";

const packages = {
  "cert-manager.io": "@kubernetes-models/cert-manager",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "networking.istio.io": "@kubernetes-models/istio",
  "security.istio.io": "@kubernetes-models/istio",
  "telemetry.istio.io": "@kubernetes-models/istio",
  "install.istio.io": "@kubernetes-models/istio",
};

async function modelFor(apiVersion, kind) {
  const slash = apiVersion.indexOf("/");
  const group = slash < 0 ? "" : apiVersion.slice(0, slash);
  const version = apiVersion.slice(slash + 1);
  const pkg = packages[group] ?? "kubernetes-models";
  const path = group === "" ? `${pkg}/${version}/${kind}` : `${pkg}/${group}/${version}/${kind}`;
  try {
    return (await import(path))[kind];
  } catch {
    return undefined;
  }
}

// Envoy Gateway's SecurityPolicy, its extAuth.grpc part (v1.9). Only what the examples use is
// allowed; a misspelt or invented field is an error, as the API server's structural schema
// would make it.
const gatewayApiDuration = { type: "string", pattern: "^([0-9]{1,5}(h|m|s|ms)){1,4}$" };
const backendRef = {
  type: "object",
  additionalProperties: false,
  required: ["name"],
  properties: {
    group: { type: "string" },
    kind: { type: "string" },
    name: { type: "string", minLength: 1 },
    namespace: { type: "string" },
    port: { type: "integer", minimum: 1, maximum: 65535 },
  },
};
const securityPolicy = {
  type: "object",
  required: ["apiVersion", "kind", "metadata", "spec"],
  properties: {
    apiVersion: { const: "gateway.envoyproxy.io/v1alpha1" },
    kind: { const: "SecurityPolicy" },
    metadata: { type: "object", required: ["name"] },
    spec: {
      type: "object",
      additionalProperties: false,
      properties: {
        targetRefs: {
          type: "array",
          minItems: 1,
          items: {
            type: "object",
            additionalProperties: false,
            required: ["group", "kind", "name"],
            properties: {
              group: { type: "string" },
              kind: { type: "string" },
              name: { type: "string" },
              sectionName: { type: "string" },
            },
          },
        },
        extAuth: {
          type: "object",
          additionalProperties: false,
          required: ["grpc"],
          properties: {
            grpc: {
              type: "object",
              additionalProperties: false,
              required: ["backendRefs"],
              properties: { backendRefs: { type: "array", minItems: 1, maxItems: 16, items: backendRef } },
            },
            headersToExtAuth: { type: "array", items: { type: "string" } },
            timeout: gatewayApiDuration,
            failOpen: { type: "boolean" },
            recomputeRoute: { type: "boolean" },
            statusOnError: {
              enum: [400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414,
                415, 416, 417, 421, 422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504,
                505, 506, 507, 508, 510, 511],
            },
            contextExtensions: {
              type: "array",
              items: {
                type: "object",
                additionalProperties: false,
                required: ["name", "type"],
                properties: {
                  name: { type: "string" },
                  type: { enum: ["Value", "ValueRef"] },
                  value: { type: "string" },
                },
              },
            },
          },
        },
      },
    },
  },
};
const checkSecurityPolicy = new Ajv({ allErrors: true, strict: false }).compile(securityPolicy);

async function validate(object) {
  const { apiVersion, kind } = object;
  if (apiVersion === "gateway.envoyproxy.io/v1alpha1" && kind === "SecurityPolicy") {
    return checkSecurityPolicy(object)
      ? []
      : checkSecurityPolicy.errors.map((e) => `${e.instancePath} ${e.message}`);
  }
  const Model = await modelFor(apiVersion, kind);
  if (!Model) return [`no schema for ${apiVersion} ${kind}`];
  try {
    new Model(object).validate();
    return [];
  } catch (e) {
    return [String(e.message ?? e)];
  }
}

let failed = false;
for (const file of process.argv.slice(2)) {
  const text = readFileSync(file === "-" ? 0 : file, "utf8");
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length) {
      console.log(JSON.stringify({ file, errors: doc.errors.map(String) }));
      failed = true;
      continue;
    }
    const object = doc.toJSON();
    if (object == null) continue;
    const errors = await validate(object);
    failed ||= errors.length > 0;
    console.log(JSON.stringify({
      file, apiVersion: object.apiVersion, kind: object.kind, name: object.metadata?.name, errors,
    }));
  }
}
process.exit(failed ? 1 : 0);
