"""OpenAPI schema additions: the request bodies that the raw routes read themselves.

The infer route reads its raw body (JSON or the binary extension, no pydantic on the hot path), and
the repository routes do the same, so FastAPI cannot see their bodies. This adds the Open Inference
Protocol's `$inference_request` (and the repository bodies) to /openapi.json, plus the `{"error"}`
responses, so clients and fuzzers (tests/test_hardening_fuzz.py) know what to send.
"""

from __future__ import annotations

from typing import Any

from backends.datatypes import V2_TO_NUMPY

PARAMETERS = {
    "type": "object",
    "description": "$parameters: string, number or boolean values. Reserved: timeout (µs), binary_data_output, ...",
    "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]},
}
TENSOR_DATA = {"description": "Row-major tensor data, a JSON array, flat or nested (absent when "
                              "parameters.binary_data_size points into the binary part of the body). Elements by "
                              "datatype: BOOL true/false; integer types JSON integers in the datatype's range; "
                              "FP16/FP32/FP64 JSON numbers finite in the datatype; BYTES strings. No null."}
REQUEST_INPUT = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": sorted(V2_TO_NUMPY)},
        "parameters": {"$ref": "#/components/schemas/InferParameters"},
        "data": TENSOR_DATA,
    },
}
REQUEST_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "parameters": {"$ref": "#/components/schemas/InferParameters"}},
}
INFERENCE_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"$ref": "#/components/schemas/InferParameters"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferRequestInput"}},
        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferRequestOutput"}},
    },
}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
REPOSITORY_INDEX = {"type": "object", "properties": {"ready": {"type": "boolean"}}}
REPOSITORY_LOAD = {"type": "object", "properties": {"parameters": {"$ref": "#/components/schemas/InferParameters"}}}

_ERROR_RESPONSE = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _body(schema_ref: str, binary: bool = False, required: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": schema_ref}}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"required": required, "content": content}


def extend(schema: dict[str, Any]) -> dict[str, Any]:
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update({"InferParameters": PARAMETERS, "InferRequestInput": REQUEST_INPUT,
                  "InferRequestOutput": REQUEST_OUTPUT, "InferenceRequest": INFERENCE_REQUEST, "Error": ERROR,
                  "RepositoryIndexRequest": REPOSITORY_INDEX, "RepositoryLoadRequest": REPOSITORY_LOAD})
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method != "post":
                continue
            if path.endswith("/infer"):
                op["requestBody"] = _body("#/components/schemas/InferenceRequest", binary=True)
                op.setdefault("parameters", []).append({
                    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "Binary tensor extension: length of the JSON header at the start of the body"})
            elif path.endswith("/repository/index"):
                op["requestBody"] = _body("#/components/schemas/RepositoryIndexRequest", required=False)
            elif path.endswith("/load") or path.endswith("/unload"):
                op["requestBody"] = _body("#/components/schemas/RepositoryLoadRequest", required=False)
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                for code in ("400", "404", "503"):
                    op["responses"].setdefault(code, {"description": "Error", **_ERROR_RESPONSE})
                op["responses"].pop("422", None)  # FastAPI's default; this server answers 400 instead
    return schema


def install(app) -> None:
    """Replace app.openapi with one that adds the raw bodies (cached like FastAPI's)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = extend(original())
        return app.openapi_schema

    app.openapi = openapi
