"""CloudEvents of captured requests and responses to an HTTP sink, as KServe's payload logger sends them.

Binary content mode (CloudEvents HTTP binding 1.0): the v2 request / response JSON is the body,
the event attributes are `ce-*` headers — `ce-specversion: 1.0`, `ce-id` (the request id, the
same on the request and its response event), `ce-type` (org.kubeflow.serving.inference.request |
.response), `ce-source`, `ce-time`, and KServe's extensions `ce-inferenceservicename`,
`ce-namespace`, `ce-component`, `ce-endpoint`. A consumer written for KServe's logger (an
event-display, a Knative broker, Seldon's request logger) takes them unchanged.

One sender thread; a bounded buffer (full → the event is dropped and counted); each event is
retried with exponential backoff before it is counted as failed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger("kiln.monitor")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class CloudEventSink:
    def __init__(self, url: str, *, buffer: int = 1024, retries: int = 3, timeout_s: float = 5.0,
                 backoff_s: float = 0.1, on_result: Callable[[str, str, str], None] | None = None):
        self.url = url
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.on_result = on_result or (lambda model, version, result: None)
        self.source = f"http://{socket.gethostname()}/kiln"
        self.namespace = os.environ.get("POD_NAMESPACE", "")
        self._buffer: deque = deque()
        self._capacity = buffer
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kiln-monitor-sink", daemon=True)
        self._thread.start()

    def submit(self, model: str, version: str, request_id: str, when: float, request_json: bytes,
               response_json: bytes) -> None:
        """Queue the request and response events of one captured request (never blocks)."""
        for ce_type, body in ((REQUEST_TYPE, request_json), (RESPONSE_TYPE, response_json)):
            if len(self._buffer) >= self._capacity:
                self.on_result(model, version, "dropped")
                continue
            headers = {
                "content-type": "application/json",
                "ce-specversion": "1.0",
                "ce-id": request_id,
                "ce-type": ce_type,
                "ce-source": self.source,
                "ce-time": _rfc3339(when),
                "ce-inferenceservicename": model,
                "ce-namespace": self.namespace,
                "ce-component": "predictor",
                "ce-endpoint": f"v{version}",
            }
            self._buffer.append((model, version, headers, body))
        self._wake.set()

    def _send(self, headers: dict[str, str], body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
            r.read()

    def _run(self) -> None:
        while True:
            if not self._buffer:
                if self._stop:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            model, version, headers, body = self._buffer.popleft()
            for attempt in range(self.retries + 1):
                try:
                    self._send(headers, body)
                    self.on_result(model, version, "sent")
                    break
                except (OSError, urllib.error.URLError) as err:  # HTTPError (4xx/5xx) is a URLError too
                    if attempt == self.retries or self._stop:
                        log.warning("CloudEvent %s of %s to %s failed after %d attempt(s): %s", headers["ce-id"],
                                    model, self.url, attempt + 1, err)
                        self.on_result(model, version, "failed")
                        break
                    time.sleep(self.backoff_s * 2 ** attempt)

    def pending(self) -> int:
        return len(self._buffer)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (up to `timeout`), then stop."""
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop = True
        self._wake.set()
        self._thread.join(max(0.1, deadline - time.monotonic()))
