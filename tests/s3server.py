"""A real S3-protocol server for the tests: moto's standalone server on a free loopback port.

The server runs in a thread of the test process, so its request log can be read directly: every HTTP
request any client sends it (this process or a training subprocess) is recorded as it arrives.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

# moto accepts any credentials. These are deliberately distinctive so that a test can search the files
# and logs for them: neither may ever be written anywhere.
ACCESS_KEY = "GENESISTESTKEY7Q2X9Z"
SECRET_KEY = "genesis-test-secret-Zq81vX0pLm4Rt7WcYe"
REGION = "eu-west-1"


@dataclass(frozen=True)
class Request:
    """One HTTP request as the server saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    #: The ``If-Match`` / ``If-None-Match`` precondition the request carried, if any (``"If-Match: <etag>"``).
    condition: str | None = None
    #: The source of a server-side copy (``x-amz-copy-source``), if the request is one.
    copy_source: str | None = None

    @property
    def is_listing(self) -> bool:
        """A ListObjects(V2) call: a bucket-level GET with list parameters."""
        bucket_level = self.path.strip("/").count("/") == 0
        return self.method == "GET" and bucket_level and not ({"uploads", "versioning"} & set(self.query))

    def __str__(self) -> str:
        q = "&".join(sorted(self.query))
        return f"{self.method} {self.path}{'?' + q if q else ''}"


class _Recorder:
    """WSGI middleware that appends every request to a list before moto handles it."""

    CONDITIONS = (("If-Match", "HTTP_IF_MATCH"), ("If-None-Match", "HTTP_IF_NONE_MATCH"))

    def __init__(self, app: Any) -> None:
        self.app = app
        self.log: list[Request] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        condition = next(
            (f"{h}: {environ[k]}" for h, k in self.CONDITIONS if k in environ),
            None,
        )
        req = Request(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO", ""),
            parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
            condition,
            environ.get("HTTP_X_AMZ_COPY_SOURCE"),
        )
        with self.lock:
            self.log.append(req)
        return self.app(environ, start_response)


class _QuietHandler(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the recorder keeps the log; one stderr line per request would drown the test output


class S3Server:
    """moto's S3 server on ``127.0.0.1`` and a port the OS picks (so parallel runs never collide)."""

    def __init__(self) -> None:
        self._recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._recorder, threaded=True, request_handler=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto-s3", daemon=True)
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        self._server.server_close()

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """What a user passes as ``storage_options`` to reach this server through s3fs."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"region_name": REGION},
            **extra,
        }

    def requests_since(self, mark: int) -> list[Request]:
        """Requests received after :meth:`mark` returned ``mark``."""
        with self._recorder.lock:
            return list(self._recorder.log[mark:])

    def mark(self) -> int:
        """A position in the request log, for :meth:`requests_since`."""
        with self._recorder.lock:
            return len(self._recorder.log)
