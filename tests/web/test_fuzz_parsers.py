"""Every parser an outside client reaches, fuzzed for cost: each input must take bounded CPU
time and bounded memory, not only end without a 500.

Targets: delivery ids (`GET /deliveries/{id}`), signature headers (every scheme), form bodies,
package events and push bodies (`selector`), Flux events (`/events`). Each mixes random input
with hostile shapes found by the attacks these bounds answer (compression bombs, deep nesting,
millions of escapes, thousands of signature candidates). Each runs a fixed number of examples
(`EXAMPLES`, the same in CI) and the counts are printed at the end of the module.

The bounds are generous (a slow shared CI machine must pass them) and sit far below what the
unbounded parsers took: 0.3-2 s and 100+ MB for one input.
"""

from __future__ import annotations

import contextlib
import json
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from itsdangerous.encoding import base64_encode

from receiver import signatures as sig
from receiver.delivery import record as dr
from receiver.gitea.payloads import PayloadError, form_payload
from receiver.push.selector import PayloadRefused, select_payload
from receiver.status.flux_events import EventError, parse_event

# Hostile inputs are megabytes long: hypothesis warns about printing them, which is only a cost.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
EXAMPLES = 150
CPU_SECONDS = 0.25  # per input, process time
TOKEN = "fuzz-token"
NOW = 1_760_000_000.0
CASES: dict[str, int] = {}
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)


def bounded(name: str, call: Callable[[], Any], memory: int) -> None:
    """Run `call` once for CPU time, once under tracemalloc for its peak; assert both. The CPU
    time is this thread's: threads other tests left running in the process do not count."""
    CASES[name] = CASES.get(name, 0) + 1
    started = time.thread_time()
    call()
    spent = time.thread_time() - started
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert spent < CPU_SECONDS, (name, spent)
    assert peak < memory, (name, peak, memory)


@pytest.fixture(scope="module", autouse=True)
def _report_cases(pytestconfig: pytest.Config) -> Any:
    yield
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and CASES:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz_parsers: {sum(CASES.values())} cases ({parts}); "
                                f"bounds {CPU_SECONDS} s CPU and a memory bound per input")


MiB = 1024 * 1024
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["ref", "after", "repository", "commits", "package", "version", "type",
                         "owner", "name", "involvedObject", "reason", "message", "metadata",
                         "kind", "namespace", "x"]), inner, max_size=5),
    max_leaves=30)


# -- delivery ids -----------------------------------------------------------------------------

def _packed(raw: bytes, compress: bool) -> str:
    body = "." + base64_encode(zlib.compress(raw, 9)).decode() if compress else \
        base64_encode(raw).decode()
    return body + "." + "A" * 43


def _bomb(unit: bytes, count: int) -> str:
    return _packed(b'[1,"a/b","","",0,"",0,[' + unit * count + b"[]]]", True)


hostile_ids = st.sampled_from([
    _bomb(b"[],", 1_500_000), _bomb(b"[", 3_000_000), _bomb(b'"a",', 1_000_000),
    _packed(b'[1,"a/b","","",' + b"9" * 4000 + b',"m",0,[]]', True),
    "x" * 7000, "." * 6000, "A." * 3000,
])
random_ids = st.one_of(
    st.text(max_size=200),
    st.builds(_packed, json_values.map(lambda v: json.dumps(v).encode()), st.booleans()),
    hostile_ids,
)


@fuzz
@given(random_ids, st.booleans())
def test_fuzz_delivery_ids(delivery_id: str, signed: bool) -> None:
    if signed and delivery_id.count(".") >= 1:
        # Signed with the right key: the bounds after the signature hold too.
        payload = delivery_id.rsplit(".", 1)[0]
        delivery_id = dr._serializer(TOKEN).make_signer().sign(payload).decode()

    def read() -> None:
        claimed = dr.receiver_of(delivery_id)
        assert claimed is None or isinstance(claimed, str)
        record = dr.decode(delivery_id, TOKEN)
        assert record is None or isinstance(record, dr.DeliveryRecord)

    bounded("delivery_id", read, 1 * MiB)


# -- signature headers --------------------------------------------------------------------------

header_text = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
    st.builds(lambda n: "t=1760000000," + ",".join(["v1=" + "0" * 64] * n),
              st.integers(0, 2000)),
    st.builds(lambda n: "sha256=" + "a" * n, st.integers(0, 60_000)),
    st.builds(lambda n: "Bearer " + "x" * n, st.integers(0, 60_000)),
)


@fuzz
@given(st.dictionaries(st.sampled_from(["x-signature", "x-gitea-signature", "authorization",
                                        "x-hub-signature-256", "x-hub-signature"]),
                       header_text, max_size=3),
       st.binary(max_size=2000), st.text(max_size=100))
def test_fuzz_signature_headers(headers: dict[str, str], body: bytes, delivery_id: str) -> None:
    def verify() -> None:
        for verdict in (
            sig.verify_gitea(headers, body, TOKEN),
            sig.verify_generic_hmac(headers, body, TOKEN),
            sig.verify_generic(headers, body, TOKEN, NOW, allow_unsigned=False),
            sig.verify_event(headers, body, TOKEN),
            sig.verify_read(headers.get("x-signature", ""), delivery_id, TOKEN, NOW),
        ):
            assert not verdict.ok  # nothing random is a valid credential

    bounded("signature_headers", verify, 1 * MiB)


# -- form bodies --------------------------------------------------------------------------------

hostile_forms = st.sampled_from([
    b"payload=" + b"%41" * 1_000_000, b"&" * 3_000_000, b"%70" * 1_000_000 + b"=x",
    b"payload=" + b"+" * 3_000_000, b"a=" + b"%" * 3_000_000, b"payload=%" + b"\\" * 1_000_000,
])
forms = st.one_of(
    st.binary(max_size=500),
    st.lists(st.tuples(st.text(max_size=10), st.text(max_size=50)), max_size=60).map(
        lambda fields: "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in fields).encode()),
    hostile_forms,
)


@fuzz
@given(forms)
def test_fuzz_form_bodies(body: bytes) -> None:
    def parse() -> None:
        with contextlib.suppress(PayloadError):
            assert len(form_payload(body)) <= len(body)

    # Decoding copies the field a few times in C (`+`, backslashes, `%`): about 4 bytes per byte.
    bounded("form_body", parse, 4 * len(body) + 1 * MiB)


# -- package events and push bodies (after the signature) --------------------------------------

def _package(version: str, extra: Any) -> bytes:
    return json.dumps({"action": "created", "package": {
        "type": "container", "name": "apps", "version": version, "html_url": extra,
        "owner": {"login": "platform", "html_url": "https://gitea.example.com/platform"}},
        "sender": extra}).encode()


hostile_documents = st.sampled_from([
    b"[" * 100_000 + b"]" * 100_000, b"[" + b"[]," * 1_000_000 + b"[]]",
    _package("1" * 1_000_000, None), _package("v1", ["x"] * 200_000),
    json.dumps({"ref": "refs/heads/" + "a" * 1_000_000, "commits": []}).encode(),
    json.dumps({"commits": [{"added": [f"p{i}" for i in range(30_000)]}]}).encode(),
])
documents = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(_package, st.text(max_size=40), json_values),
    hostile_documents,
)


@fuzz
@given(documents, st.sampled_from(["github", "generic", "generic-hmac"]))
def test_fuzz_package_events_and_push_bodies(document: bytes, receiver_type: str) -> None:
    def select() -> None:
        with contextlib.suppress(PayloadRefused):
            select_payload(receiver_type, document)

    # Parsed JSON takes more room than its text: at most ~22 bytes per byte ([] as a list).
    bounded("push_or_package", select, 32 * len(document) + 1 * MiB)


# -- Flux events ---------------------------------------------------------------------------------

def _event(message: str, metadata: Any) -> bytes:
    return json.dumps({"involvedObject": {"kind": "Kustomization", "namespace": "flux-system",
                                          "name": "apps"},
                       "severity": "info", "reason": "ReconciliationSucceeded",
                       "message": message, "metadata": metadata,
                       "timestamp": "2026-01-01T00:00:00Z"}).encode()


hostile_events = st.sampled_from([
    _event("m" * 2_000_000, {}), _event("m", {f"k{i}": "v" for i in range(100_000)}),
    _event("\ud800" * 10_000, {"revision": "main@sha1:" + "a" * 1_000_000}),
    b"{" + b'"a":{' * 50_000, b'{"involvedObject":' * 100_000,
])
events = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(_event, st.text(max_size=100), json_values),
    hostile_events,
)


@fuzz
@given(events)
def test_fuzz_flux_events(body: bytes) -> None:
    def parse() -> None:
        with contextlib.suppress(EventError):
            parse_event(body)

    bounded("flux_event", parse, 32 * len(body) + 1 * MiB)
