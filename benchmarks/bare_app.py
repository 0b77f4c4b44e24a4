"""The stack's ceiling: a bare Starlette endpoint that only checks the HMAC and parses the JSON.

The performance goals measure the bridge as a ratio of this, on the same machine in the same run.
`BARE_SPIN_US=N` makes it a control instead: the same endpoint spending N µs more of CPU per
request, which shows what latency any endpoint of the bridge's cost gets from the same load
generator (`bench_ingest --control-us`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TOKEN = os.environ.get("BARE_TOKEN", "bench-token-0").encode()
SPIN_SECONDS = int(os.environ.get("BARE_SPIN_US", "0")) / 1e6


async def hook(request: Request) -> Response:
    body = await request.body()
    expected = hmac.new(TOKEN, body, hashlib.sha256).hexdigest()
    bearer = request.headers.get("authorization", "")
    if bearer:
        # Fixed-rate runs send a new commit per request with a bearer token (bench_latency);
        # the HMAC above is still computed, so the work is the same.
        ok = hmac.compare_digest(bearer.encode(), b"Bearer " + TOKEN)
    else:
        ok = hmac.compare_digest(expected, request.headers.get("x-gitea-signature", ""))
    if not ok:
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    doc = json.loads(body)
    if SPIN_SECONDS:
        until = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < until:
            pass
    return JSONResponse({"ref": doc.get("ref")}, status_code=202)


app = Starlette(routes=[Route("/hook/{digest}", hook, methods=["POST"])])
