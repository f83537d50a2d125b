"""Schemathesis against the server's own /openapi.json: well over 1,000 generated requests, no 5xx,
and the server still answers health and a valid infer afterwards.

The schema is fuzzed three ways: as published (random model names: 404 paths, random bodies); with
the infer paths pinned to the served model (bodies reach the decoder and the model's validation);
and with the infer input narrowed to the model's input name and numeric data (bodies reach shape,
element-count and datatype checks, and some run). No 5xx is allowed anywhere: a 503 would only be
legitimate while a model is loading or unloading, and the fuzzer cannot name a real model in the
repository load/unload paths except by chance (the assertion message would show it).
"""

from __future__ import annotations

import collections
import copy
import time

import httpx
import pytest

from tests.hardening_util import add_digits, digits_body
from tests.kiln_server import start_server

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

MIN_REQUESTS = 1000


def _variants(raw: dict) -> list[tuple[str, dict]]:
    pinned = copy.deepcopy(raw)
    narrowed = copy.deepcopy(raw)
    for schema in (pinned, narrowed):
        paths = schema["paths"]
        infer = {p: paths[p] for p in paths if p.endswith("/infer")}
        for p in list(paths):
            del paths[p]
        for p, item in infer.items():
            concrete = p.replace("{model}", "digits-cnn").replace("{version}", "1")
            item = copy.deepcopy(item)
            for op in item.values():
                op["parameters"] = [q for q in op.get("parameters", []) if q.get("in") != "path"]
                op["operationId"] = op.get("operationId", "infer") + "_pinned"
            paths[concrete] = item
    inp = narrowed["components"]["schemas"]["InferRequestInput"]
    inp["properties"]["name"] = {"enum": ["input"]}
    inp["properties"]["datatype"] = {"enum": ["FP32", "FP16", "INT32", "BYTES", "BOOL"]}
    inp["properties"]["shape"] = {"type": "array", "maxItems": 6, "items": {"type": "integer", "minimum": 0, "maximum": 70}}
    inp["properties"]["data"] = {"type": "array", "maxItems": 80, "items": {"type": "number"}}
    inp["required"] = ["name", "shape", "datatype", "data"]
    return [("published", raw), ("pinned", pinned), ("narrowed", narrowed)]


def test_fuzz_openapi_no_5xx(tmp_path):
    repo = tmp_path / "repo"
    add_digits(repo)
    srv = start_server(repo, log_dir=tmp_path)
    try:
        raw = httpx.get(srv.url + "/openapi.json").json()
        infer_body = raw["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
        assert "InferenceRequest" in str(infer_body), "the infer request body must be in the OpenAPI schema"

        statuses: collections.Counter = collections.Counter()
        server_errors = []
        start = time.monotonic()
        for variant, schema_dict in _variants(raw):
            schema = schemathesis.openapi.from_dict(schema_dict)
            for result in schema.get_all_operations():
                op = result.ok()
                examples = 150 if op.path.endswith("/infer") else 50

                @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                                     suppress_health_check=list(hypothesis.HealthCheck),
                                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
                @hypothesis.given(case=op.as_strategy())
                def run(case):
                    r = case.call(base_url=srv.url, timeout=30)
                    statuses[r.status_code] += 1
                    if r.status_code >= 500:
                        server_errors.append((variant, op.method, case.formatted_path, r.status_code, r.text[:300]))

                run()
        took = time.monotonic() - start
        total = sum(statuses.values())
        print(f"\nfuzz: {total} requests in {took:.1f}s, statuses {dict(sorted(statuses.items()))}")
        assert total >= MIN_REQUESTS, statuses
        assert not server_errors, server_errors[:10]
        assert statuses[200] > 0 and statuses[400] > 0
        # Still healthy and serving.
        assert httpx.get(srv.url + "/v2/health/live").status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
        ok = httpx.post(srv.url + "/v2/models/digits-cnn/infer", content=digits_body())
        assert ok.status_code == 200 and len(ok.json()["outputs"][0]["data"]) == 10
        assert "Traceback" not in srv.log()
    finally:
        assert srv.stop() == 0
