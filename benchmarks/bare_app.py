"""The stack's ceiling: a bare Starlette endpoint that only checks the HMAC and parses the JSON.

The performance goals measure the bridge as a ratio of this, on the same machine in the same run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

TOKEN = os.environ.get("BARE_TOKEN", "bench-token-0").encode()


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
    return JSONResponse({"ref": doc.get("ref")}, status_code=202)


app = Starlette(routes=[Route("/hook/{digest}", hook, methods=["POST"])])
