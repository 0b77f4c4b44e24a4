"""A model of the whole system around a push: replicas, Receivers, the API server, Flux, Gitea.

`tests/delivery/test_system_model.py` drives it with a hypothesis state machine and checks, after every
step, what the bridge answers (`receiver.delivery.state.evaluate` and `DeliveryView.outcome`,
the marks of `receiver.delivery.marks`, the status decisions of `receiver.status.decisions`)
against what really happened in the
model: which commits Flux fetched and applied, which pushes were patched, what Gitea shows.

What is modelled, and the choices the code does not make for us:

* One branch (`refs/heads/main`) of one repository, a GitRepository `fleet` and two
  Kustomizations on it: `apps` (listed by the Receivers: annotated) and `infra` (tracked).
  Every push is routed to the same three targets, as routing does for a push to `main`.
  The branch moves forward, or is force-pushed (its head replaced by a sibling that does
  not contain it); whether a commit contains another is Git's ancestry, which Gitea answers
  each replica when asked (`delivery/ancestry`), or fails to while it is down. A commit is
  pushed to the bridge only once it is on the branch, so Flux may fetch it before or after
  any hook. "Newer" means made later.
* Two Receivers: `gitea` (Gitea's push webhook: a delivery id per request, redelivered with
  the same id) and `actions` (a CI step's generic push with a one-time signature, valid
  `TIMESTAMP_TOLERANCE_SECONDS` and replayable by whoever captured it). A request's mark is
  `delivery.marks.mark_for` of its identity, as ingest makes it.
* Replicas: each has its own `SeenOnce`, its own deliveries in flight, its own queue of
  patches and of status jobs, and its own cache (watch) of every object, which may lag the
  API server by any number of versions; a replica's own patch's answer is adopted into its
  cache at once (the kube backend does). A restart loses all of that and lists afresh.
* Ingest follows `web.ingest.IngestService` in order: replayed one-time signature (401),
  repeated Gitea delivery id (duplicate), a push joining this replica's delivery in flight of
  the same (Receiver, commit, ref), the mark already on an object of the plan (refused), the
  mark found by the patch that goes out at once (a lagging cache: refused too), else
  accepted: a record (its id made and read back by `delivery.record.encode`/`decode`), the
  source patch asked for, `pending` on the tracked consumers (`pending_for_push`).
* Patches follow `delivery.reconcile.PatchCoalescer._send_once`: every mark waiting for an object goes
  in one patch (coalesced), the value is `marks.merge` of what the replica's cache
  shows, sent conditional on its resourceVersion, read again and decided again on a 409; a
  mark the merge refuses fails its delivery on that replica (`TooManyMarks`).
  When the window closes is not modelled: a flush may come at any step, after any number of
  requests. The consumer grace period is 0 (a consumer is asked for as soon as its source is
  ready in the replica's view; Flux may still start it by itself first).
* Flux: a run of an object starts (it takes the object's `requestedAt` then, and a
  Kustomization the source's artifact revision then) and finishes later, succeeding or
  failing; a GitRepository fetches the branch head as it is when the run finishes. Runs start
  whether or not they were requested (interval, new artifact), in any order. Only the final
  status of a run is written (no intermediate Reconciling patch). Each finished
  Kustomization run, and each fetch of a new artifact, sends an event, which reaches any
  replica later, or never.
* Gitea keeps the latest status per (commit, context); it may be down (a post or a listing
  fails, the job is retried up to the settings' `statuses.max_attempts`). The status shell of
  each replica follows `status.queue` and `status.gitea_view` (one latest job per key, as
  `replaces_waiting` decides; `recall`/`recall_for_event` before asking Gitea;
  `needs_post`), a delivery's final state ends its pending as `status.signals` does, and a
  resync posts `plan_repairs` of every consumer's `desired_from_object`.
* Time is one clock for everything (unix seconds); steps advance it explicitly, and every
  event in the world (a commit, a request, a patch, a Flux run starting or ending) takes
  2 ms, more than the 1 ms `handled_since` allows for rounding: clock skew is not explored.
* The suite lowers the marks annotation's bounds (`PER_OWNER`, `MAX_ENTRIES`) so that a
  flood of a couple of dozen pushes reaches them: the same code as the real bounds.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from receiver.delivery import marks as delivery_marks
from receiver.delivery import state as delivery_state
from receiver.delivery.marks import DELIVERIES_ANNOTATION, Mark, mark_for
from receiver.delivery.patches import request_value
from receiver.delivery.record import ROLE_ANNOTATE, ROLE_TRACK, DeliveryRecord, RecordTarget, decode, encode
from receiver.delivery.view import (
    CONTAINED,
    OUTCOMES,
    SUPERSEDED,
    SUPERSEDED_OUTCOME,
    Contains,
    DeliveryView,
    TargetView,
    Timeouts,
)
from receiver.flux.objects import RECONCILE_ANNOTATION, SOURCE_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import (
    FAILED,
    FINAL_STATES,
    QUEUED,
    READY,
    SKIPPED,
    TIMED_OUT,
    attempted_revision,
    commit_of,
    progress_at,
)
from receiver.giturls import normalise_repo_url
from receiver.push.replay import SeenOnce
from receiver.signatures import TIMESTAMP_TOLERANCE_SECONDS
from receiver.status import decisions as statuses
from receiver.status import descriptions
from receiver.status import shown as shown_status
from receiver.status.flux_events import FluxEvent, InvolvedObject
from receiver.templates import StatusTemplates

T0 = 1_700_000_000.0
NS = "flux-system"
SRC = ObjectKey("GitRepository", NS, "fleet")
APPS = ObjectKey("Kustomization", NS, "apps")
INFRA = ObjectKey("Kustomization", NS, "infra")
CONSUMERS = (APPS, INFRA)
OBJECTS = (SRC, APPS, INFRA)
TARGETS = (RecordTarget(SRC, ROLE_ANNOTATE), RecordTarget(APPS, ROLE_ANNOTATE),
           RecordTarget(INFRA, ROLE_TRACK))
REF = "refs/heads/main"
REPO_URL = "https://gitea.example.com/team/fleet.git"
GITEA = f"{NS}/gitea"
ACTIONS = f"{NS}/actions"
RECEIVERS = (GITEA, ACTIONS)
TOKENS = {GITEA: "gitea-receiver-token", ACTIONS: "actions-receiver-token"}

# The service's defaults (receiver/config.py, receiver/web/app.py).
TIMEOUTS = Timeouts(source_seconds=300.0, consumer_seconds=900.0)
DEDUPE_SECONDS = 3600.0
KEEP_MARKS_SECONDS = max(DEDUPE_SECONDS, TIMESTAMP_TOLERANCE_SECONDS * 2)
PATCH_ATTEMPTS = 5
REPEAT_WINDOW = 5.0
STATUS_ATTEMPTS = 8
TEMPLATES = StatusTemplates(cluster="eu-west")
ANCESTRY_RETRY = 30.0  # a failed question to Gitea answers "no" this long (delivery/ancestry)


@dataclass(frozen=True)
class View:
    """Where a GET is answered: a cache, the replica's local outcomes, its ancestry answers."""

    name: str
    lookup: Callable[[ObjectKey], FluxObject | None]
    local: dict[ObjectKey, tuple[str, str, str]] | None
    contains: Contains
    answers: tuple[Any, ...]  # what `contains` answers depend on


class Violation(AssertionError):
    """An invariant does not hold; the message starts with `invariant N:`."""


# Told of every violation as it is found (before hypothesis shrinks it): the runner counts.
on_violation: list[Callable[[str], None]] = []


def check(condition: bool, number: int, message: str) -> None:
    if not condition:
        text = f"invariant {number}: {message}"
        for listener in on_violation:
            listener(text)
        raise Violation(text)


def commit(n: int) -> str:
    return hashlib.sha1(f"commit {n}".encode()).hexdigest()  # noqa: S324 - a Git object name


def revision(sha: str) -> str:
    return f"main@sha1:{sha}"


def normalise(url: str) -> str | None:
    return normalise_repo_url(url)


def requested_at(now: float) -> str:
    return request_value(datetime.fromtimestamp(now, UTC))


# -- the API server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One Flux run of an object: when it started, the request it took, what it ran."""

    key: ObjectKey
    started: float
    token: str | None
    revision: str = ""  # a Kustomization: the source artifact it applies


@dataclass(frozen=True)
class Written:
    """Ground truth about one object version: the Flux run whose result its status shows."""

    run: Run | None
    sha: str  # the commit that run fetched / attempted


class Conflict(Exception):
    pass


class ApiServer:
    def __init__(self, initial: str) -> None:
        self._rv = 0
        self.versions: dict[ObjectKey, list[FluxObject]] = {}
        self.written: dict[int, Written] = {}
        for key in OBJECTS:
            self._store(key, _initial_raw(key, initial), Written(None, initial))

    def _store(self, key: ObjectKey, raw: dict[str, Any], written: Written) -> FluxObject:
        self._rv += 1
        raw["metadata"]["resourceVersion"] = str(self._rv)
        obj = FluxObject(raw)
        self.versions.setdefault(key, []).append(obj)
        self.written[id(obj)] = written
        return obj

    def latest(self, key: ObjectKey) -> FluxObject:
        return self.versions[key][-1]

    def index(self, key: ObjectKey) -> int:
        return len(self.versions[key]) - 1

    def truth(self, obj: FluxObject) -> Written:
        return self.written[id(obj)]

    def patch(self, key: ObjectKey, annotations: dict[str, str], resource_version: str) -> FluxObject:
        """A JSON merge patch of annotations, conditional on the resourceVersion (409)."""
        current = self.latest(key)
        if current.resource_version != resource_version:
            raise Conflict(str(key))
        raw = _copy(current.raw)
        raw["metadata"]["annotations"] = {**current.annotations, **annotations}
        return self._store(key, raw, self.truth(current))

    def write_status(self, key: ObjectKey, status: dict[str, Any], written: Written) -> FluxObject:
        raw = _copy(self.latest(key).raw)
        raw["status"] = status
        return self._store(key, raw, written)


def _copy(raw: Any) -> dict[str, Any]:
    return {k: ({**v, "annotations": dict(v.get("annotations", {}))} if k == "metadata" else v)
            for k, v in raw.items()}


def _ready_condition(status: str, reason: str, message: str) -> list[dict[str, str]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": message}]


def _initial_raw(key: ObjectKey, sha: str) -> dict[str, Any]:
    rev = revision(sha)
    if key.kind == "GitRepository":
        spec: dict[str, Any] = {"url": REPO_URL, "ref": {"branch": "main"}, "interval": "1m"}
        status: dict[str, Any] = {"observedGeneration": 1, "artifact": {"revision": rev},
                                  "conditions": _ready_condition("True", "Succeeded", "")}
    else:
        spec = {"sourceRef": {"kind": "GitRepository", "name": SRC.name},
                "path": f"./{key.name}", "interval": "10m", "prune": True}
        status = {"observedGeneration": 1, "lastAppliedRevision": rev,
                  "lastAttemptedRevision": rev,
                  "conditions": _ready_condition("True", "ReconciliationSucceeded",
                                                 f"Applied revision: {rev}")}
    api = "source.toolkit.fluxcd.io/v1" if key.kind in SOURCE_KINDS else "kustomize.toolkit.fluxcd.io/v1"
    return {"apiVersion": api, "kind": key.kind,
            "metadata": {"name": key.name, "namespace": key.namespace, "generation": 1,
                         "annotations": {}},
            "spec": spec, "status": status}


# -- Gitea ------------------------------------------------------------------------------------


class GiteaDown(Exception):
    pass


class Gitea:
    def __init__(self) -> None:
        self.shown: dict[tuple[str, str], shown_status.Fields] = {}
        self.down = False
        self.posts = 0

    def listing(self, sha: str) -> dict[str, shown_status.Fields]:
        if self.down:
            raise GiteaDown("503")
        return {ctx: fields for (s, ctx), fields in self.shown.items() if s == sha}

    def post(self, status: statuses.DesiredStatus) -> None:
        if self.down:
            raise GiteaDown("503")
        self.posts += 1
        self.shown[(status.sha, status.context)] = status.fields


# -- a replica ---------------------------------------------------------------------------------

StatusKey = tuple[str, str]  # (commit, context): one instance, one repository


@dataclass
class Job:
    status: statuses.DesiredStatus
    state_only: bool
    enqueued: float
    origin: str = ""
    attempts: int = 0


@dataclass
class Followed:
    """A delivery this replica accepted and acts on (reconcile.Reconciler)."""

    id: str
    record: DeliveryRecord
    local: dict[ObjectKey, tuple[str, str, str]] = field(default_factory=dict)
    requested: set[ObjectKey] = field(default_factory=set)
    states: dict[ObjectKey, str] = field(default_factory=dict)


class Replica:
    def __init__(self, name: str, api: ApiServer, generation: int = 0) -> None:
        self.name = name
        self.generation = generation  # how many times it restarted
        self.api = api
        self.seen = SeenOnce()
        self.view_at = {key: api.index(key) for key in OBJECTS}
        self.following: dict[str, Followed] = {}
        self.in_flight: dict[tuple[str, str, str], str] = {}
        self.outbox: dict[ObjectKey, dict[str, Mark]] = {}
        self.jobs: dict[StatusKey, Job] = {}
        self.status_seen: dict[StatusKey, shown_status.Seen] = {}
        self.listed: dict[str, float] = {}
        # delivery/ancestry: (ours, held) -> answer; failed questions; questions under way.
        self.known: dict[tuple[str, str], bool] = {}
        self.failed: dict[tuple[str, str], float] = {}
        self.asking: set[tuple[str, str]] = set()

    def contains(self, now: float) -> Contains:
        """This replica's `ancestry.Ancestry.contains`: a known answer, "no" for a while after
        a failed question, else None while Gitea is asked."""
        def contains(source: FluxObject, ours: str, held: str) -> bool | None:
            pair = (ours.lower(), held.lower())
            if pair in self.known:
                return self.known[pair]
            if self.failed.get(pair, -1.0) > now:
                return False
            self.asking.add(pair)
            return None
        return contains

    def ancestry_state(self, now: float) -> tuple[Any, ...]:
        """What this replica's answers depend on (for the evaluation cache)."""
        return (frozenset(self.known.items()),
                frozenset(p for p, until in self.failed.items() if until > now))

    def get(self, key: ObjectKey) -> FluxObject | None:
        return self.api.versions[key][self.view_at[key]]

    def adopt(self, obj: FluxObject) -> None:
        index = self.api.versions[obj.key].index(obj)
        self.view_at[obj.key] = max(self.view_at[obj.key], index)

    # -- status shell (status.queue) --------------------------------------------------------

    def enqueue(self, wanted: list[statuses.DesiredStatus], now: float, *, state_only: bool,
                origin: str = "") -> None:
        for status in wanted:
            key = (status.sha, status.context)
            job = Job(status, state_only, now, origin)
            current = self.jobs.get(key)
            if current is not None:
                if not statuses.replaces_waiting(current.status, current.state_only, status,
                                                 state_only):
                    continue
                job.attempts = current.attempts
            self.jobs[key] = job

    def recall_job(self, key: StatusKey, job: Job, now: float) -> tuple[bool, shown_status.Fields | None]:
        seen, listed = self.status_seen.get(key), self.listed.get(key[0])
        if not job.origin:
            return shown_status.recall(seen, listed, now, REPEAT_WINDOW)
        return shown_status.recall_for_event(seen, listed, now, REPEAT_WINDOW, job.origin, job.enqueued)

    def observe(self, key: StatusKey, fields: shown_status.Fields, at: float, origin: str = "") -> None:
        current = self.status_seen.get(key)
        if current is not None and current.at > at:
            return
        self.status_seen[key] = shown_status.Seen(fields, at, origin)

    def read_commit(self, gitea: Gitea, sha: str, now: float) -> dict[str, shown_status.Fields]:
        shown = gitea.listing(sha)
        for context, fields in shown.items():
            self.observe((sha, context), fields, now)
        self.listed[sha] = now
        return shown

    def work(self, key: StatusKey, gitea: Gitea, now: float) -> None:
        """`status.queue`'s delivery of one job."""
        job = self.jobs.pop(key)
        status = job.status
        try:
            known, shown = self.recall_job(key, job, now)
            if not known:
                shown = self.read_commit(gitea, status.sha, now).get(status.context)
                known = True
            if known and not shown_status.needs_post(shown, status.fields, state_only=job.state_only):
                return
            gitea.post(status)
        except GiteaDown:
            job.attempts += 1
            if job.attempts < STATUS_ATTEMPTS:
                self.jobs.setdefault(key, job)
            return
        self.observe(key, status.fields, now, job.origin)


# -- the system ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One push request as sent; a replay or redelivery sends the same one again."""

    number: int
    receiver: str
    sha: str
    sent: float
    mark: str
    until: float
    one_time: bool  # a one-time signature (a repeat is 401), else a Gitea delivery id


@dataclass(frozen=True)
class Accepted:
    id: str
    record: DeliveryRecord
    request: Request
    replica: str


class System:
    def __init__(self, replicas: int = 3) -> None:
        self.now = T0
        self.branch = [commit(0)]  # every commit made, in the order it was made
        self.parent: dict[str, str | None] = {self.branch[0]: None}
        self.head = self.branch[0]  # what refs/heads/main points at
        self.api = ApiServer(self.branch[0])
        self.replicas = [Replica(f"r{i}", self.api) for i in range(replicas)]
        self.restarts = 0
        self.gitea = Gitea()
        self.requests: list[Request] = []
        self.accepted: list[Accepted] = []
        self.by_mark: dict[str, Accepted] = {}
        # Requests refused because their mark was on the objects (anywhere after that), or
        # by a replica's memory (that replica, until it restarts).
        self.refused_by_cluster: dict[int, dict[ObjectKey, int]] = {}
        self.refused_by_memory: set[tuple[int, str, int]] = set()
        self.patched: dict[tuple[ObjectKey, str], int] = defaultdict(int)
        self.patch_failures = 0
        self.runs: dict[ObjectKey, Run] = {}
        self.fetched: set[str] = {self.branch[0]}
        self.applied: dict[ObjectKey, set[str]] = {k: {self.branch[0]} for k in CONSUMERS}
        self.events: list[tuple[str, FluxEvent]] = []
        self.last_event: dict[ObjectKey, FluxEvent] = {}
        self._event_number = 0
        self._views: dict[tuple[Any, ...], DeliveryView] = {}

    # -- time and Git ----------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self.now = round(self.now + seconds, 3)

    def event(self) -> None:
        """Time passes between any two things that happen in the world (2 ms, more than the
        1 ms `handled_since` allows for rounding): the model does not explore clock skew."""
        self.advance(0.002)

    def new_commit(self, force: bool = False) -> str:
        """A commit on the branch; `force`: it replaces the head (an amended commit pushed with
        --force), so it does not contain the commit it replaced."""
        self.event()
        sha = commit(len(self.branch))
        self.parent[sha] = self.parent[self.head] if force else self.head
        self.branch.append(sha)
        self.head = sha
        return sha

    def on_branch(self, back: int) -> str:
        """The head, or one of its first ancestors."""
        sha = self.head
        for _ in range(back):
            sha = self.parent[sha] or sha
        return sha

    def order(self, sha: str) -> int:
        return self.branch.index(sha)

    # -- pushes (ingest) ---------------------------------------------------------------------

    def request(self, receiver: str, sha: str) -> Request:
        self.event()
        number = len(self.requests)
        if receiver == ACTIONS:
            stamp = int(self.now)
            key = f"{stamp}:{hashlib.sha256(f'{number}'.encode()).hexdigest()}"
            req = Request(number, receiver, sha, self.now, mark_for(receiver, "sig:" + key),
                          stamp + TIMESTAMP_TOLERANCE_SECONDS + 1, one_time=True)
        else:
            req = Request(number, receiver, sha, self.now,
                          mark_for(receiver, f"gitea:delivery-{number}"),
                          self.now + DEDUPE_SECONDS, one_time=False)
        self.requests.append(req)
        return req

    def send(self, replica: Replica, req: Request) -> str:
        """What one replica answers a request (accepted, joined, replayed, duplicate, stale),
        and invariant 4 on it: a request refused within its window stays refused by the marks
        on the objects (for any replica whose cache has caught up with the refusal), and by
        a replica's memory on that replica (until it restarts)."""
        self.event()
        refusal = self.refused_by_cluster.get(req.number)
        answer = self._ingest(replica, req)
        if answer == "accepted" and self.now <= req.until and refusal is not None:
            check(any(replica.view_at[key] < index for key, index in refusal.items()), 4,
                  f"request {req.number} ({req.receiver}, mark {req.mark}) was refused by the "
                  f"mark on the objects before and is accepted now on {replica.name}, whose "
                  "cache has caught up with that refusal")
        if answer == "accepted" and self.now <= req.until:
            check((req.number, replica.name, replica.generation) not in self.refused_by_memory, 4,
                  f"request {req.number} was refused by {replica.name} before and is accepted "
                  "by it now")
        return answer

    def _ingest(self, replica: Replica, req: Request) -> str:
        now = self.now
        if req.one_time and abs(now - int(req.sent)) > TIMESTAMP_TOLERANCE_SECONDS:
            return "stale"
        memory = (req.number, replica.name, replica.generation)
        if req.mark in replica.seen:
            self.refused_by_memory.add(memory)
            return "replayed" if req.one_time else "duplicate"
        joined = replica.in_flight.get((req.receiver, req.sha, REF))
        if joined is not None:
            replica.seen.remember(req.mark, req.until, now)
            return "joined"
        in_cluster = any(delivery_marks.has(obj.annotations, req.mark)
                         for t in TARGETS if (obj := replica.get(t.key)) is not None)
        if req.mark in replica.seen or in_cluster:
            replica.seen.remember(req.mark, req.until, now)
            if in_cluster:
                self.refused_by_cluster.setdefault(req.number, dict(replica.view_at))
            else:
                self.refused_by_memory.add(memory)
            return "replayed" if req.one_time else "duplicate"
        replica.seen.remember(req.mark, req.until, now)
        if not replica.outbox.get(SRC) and delivery_marks.has(
                self.api.latest(SRC).annotations, req.mark):
            # The patch goes out at once (nothing else waits for this object on this replica),
            # conditional on the cached version: a lagging cache gets 409, reads the object
            # again and finds the mark, so nothing is sent and the request is refused
            # (`Reconciler.start_delivery` answers True).
            return "replayed" if req.one_time else "duplicate"
        record = DeliveryRecord(req.receiver, req.sha, REF, round(now, 3), req.mark, TARGETS)
        delivery_id, record = encode(record, TOKENS[req.receiver])
        accepted = Accepted(delivery_id, record, req, replica.name)
        self.check_id(accepted)
        self.accepted.append(accepted)
        self.by_mark[req.mark] = accepted
        replica.following[delivery_id] = Followed(delivery_id, record)
        replica.in_flight[(req.receiver, req.sha, REF)] = delivery_id
        replica.following[delivery_id].requested.add(SRC)
        replica.outbox.setdefault(SRC, {})[req.mark] = Mark(req.mark, record.received)
        self._pending_for_push(replica, record)
        return "accepted"

    def _pending_for_push(self, replica: Replica, record: DeliveryRecord) -> None:
        wanted = []
        source = replica.get(SRC)
        for key in CONSUMERS:
            obj = replica.get(key)
            if obj is None or progress_at(obj, record.sha).state == READY:
                continue
            desired = statuses.pending_for_push(obj, source, record.sha, TEMPLATES, normalise)
            if desired is not None:
                wanted.append(desired)
        replica.enqueue(wanted, self.now, state_only=False)

    # -- patches (reconcile.PatchCoalescer._send_once) -----------------------------------------

    def flush(self, replica: Replica, key: ObjectKey) -> list[str]:
        """Send every mark waiting for `key` in one patch; returns the marks written."""
        marks = list(replica.outbox.pop(key, {}).values())
        if not marks:
            return []
        self.event()
        obj = replica.get(key)
        assert obj is not None
        for _attempt in range(PATCH_ATTEMPTS):
            missing = [m for m in marks if not delivery_marks.has(obj.annotations, m.mark)]
            if not missing:
                return []
            merge = delivery_marks.merge(obj.annotations, missing, self.now, KEEP_MARKS_SECONDS)
            if merge.refused:
                self._patch_failed(replica, key, list(merge.refused), "TooManyMarks",
                                   delivery_marks.refusal(KEEP_MARKS_SECONDS))
            if not merge.written:
                return []
            try:
                written = self.api.patch(key, {RECONCILE_ANNOTATION: requested_at(self.now),
                                              DELIVERIES_ANNOTATION: merge.value},
                                         obj.resource_version)
            except Conflict:
                obj = self.api.latest(key)
                continue
            replica.adopt(written)
            for m in merge.written:
                self.patched[(key, m.mark)] += 1
                req = self.by_mark[m.mark].request
                check(self.patched[(key, m.mark)] == 1 or self.now > req.until, 4,
                      f"{key} patched {self.patched[(key, m.mark)]} times for push {m.mark} "
                      f"(request {req.number}, {req.receiver}) within its window")
            return [m.mark for m in merge.written]
        self._patch_failed(replica, key, marks, "AnnotateFailed", "conflicts")
        return []

    def _patch_failed(self, replica: Replica, key: ObjectKey, marks: list[Mark], reason: str,
                      error: str) -> None:
        self.patch_failures += 1
        wanted = {m.mark for m in marks}
        for followed in replica.following.values():
            if followed.record.mark in wanted:
                followed.local[key] = (FAILED, reason, error)

    # -- following deliveries (reconcile.Reconciler._evaluate) ---------------------------------

    def reconcile(self, replica: Replica) -> None:
        for followed in list(replica.following.values()):
            record = followed.record
            view = delivery_state.evaluate(record, replica.get, self.now, TIMEOUTS, followed.local,
                                           replica.contains(self.now))
            for target in view.targets:
                if (target.role == ROLE_ANNOTATE and target.state == QUEUED
                        and not target.is_source and target.key not in followed.requested
                        and delivery_state.source_ready(record, view, replica.get(target.key),
                                                        replica.get)):
                    followed.requested.add(target.key)
                    replica.outbox.setdefault(target.key, {})[record.mark] = Mark(
                        record.mark, record.received)
            for target in view.targets:
                before = followed.states.get(target.key)
                if before == target.state or before in FINAL_STATES:
                    continue
                self._on_target_changed(replica, record, target)
            followed.states = {t.key: t.state for t in view.targets}
            if view.final:
                del replica.following[followed.id]
                push = (record.receiver, record.sha, record.ref)
                if replica.in_flight.get(push) == followed.id:
                    del replica.in_flight[push]

    def _on_target_changed(self, replica: Replica, record: DeliveryRecord,
                           target: TargetView) -> None:
        key = target.key
        state = statuses.outcome_to_post(target.state, target.reason)
        if key not in CONSUMERS or state is None:
            return
        obj, source = replica.get(key), replica.get(SRC)
        assert obj is not None
        if state in (TIMED_OUT, SUPERSEDED_OUTCOME):
            desired = statuses.desired_after_timeout(
                obj, source, record.sha, TEMPLATES, normalise,
                target.commit if state == SUPERSEDED_OUTCOME else "")
        else:
            desired = statuses.desired_from_object(obj, source, TEMPLATES, normalise)
        if desired is not None and desired.sha == record.sha:
            replica.enqueue([desired], self.now, state_only=True)

    # -- Flux --------------------------------------------------------------------------------

    def flux_start(self, key: ObjectKey) -> bool:
        if key in self.runs:
            return False
        self.event()
        latest = self.api.latest(key)
        rev = ""
        if key in CONSUMERS:
            artifact = self.api.latest(SRC).status.get("artifact") or {}
            rev = str(artifact.get("revision", ""))
        self.runs[key] = Run(key, self.now, latest.annotations.get(RECONCILE_ANNOTATION), rev)
        return True

    def flux_finish(self, key: ObjectKey, ok: bool) -> bool:
        run = self.runs.pop(key, None)
        if run is None:
            return False
        self.event()
        status = dict(self.api.latest(key).status)
        status["observedGeneration"] = 1
        if run.token is not None:
            status["lastHandledReconcileAt"] = run.token
        if key == SRC:
            sha = self.head
            old = str((status.get("artifact") or {}).get("revision", ""))
            if ok:
                status["artifact"] = {"revision": revision(sha)}
                status["conditions"] = _ready_condition(
                    "True", "Succeeded", f"stored artifact for revision '{revision(sha)}'")
                self.fetched.add(sha)
                if old != revision(sha):
                    self._event(key, "info", "NewArtifact",
                                f"stored artifact for commit '{sha[:7]}'", revision(sha))
                self.api.write_status(key, status, Written(run, sha))
            else:
                # The artifact stays what an earlier run fetched: this run went nowhere.
                status["conditions"] = _ready_condition(
                    "False", "GitOperationFailed", "failed to checkout and determine revision")
                self.api.write_status(key, status, self.api.truth(self.api.latest(key)))
            return True
        sha = commit_of(run.revision) or ""
        status["lastAttemptedRevision"] = run.revision
        if ok:
            status["lastAppliedRevision"] = run.revision
            status["conditions"] = _ready_condition(
                "True", "ReconciliationSucceeded", f"Applied revision: {run.revision}")
            self.applied[key].add(sha)
            self._event(key, "info", "ReconciliationSucceeded",
                        "Reconciliation finished in 1.2s, next run in 10m0s", run.revision)
        else:
            status["conditions"] = _ready_condition(
                "False", "BuildFailed", "kustomize build failed: accumulating resources")
            self._event(key, "error", "BuildFailed",
                        "kustomize build failed: accumulating resources", run.revision)
        self.api.write_status(key, status, Written(run, sha))
        return True

    def _event(self, key: ObjectKey, severity: str, reason: str, message: str, rev: str) -> None:
        self._event_number += 1
        api = "source.toolkit.fluxcd.io/v1" if key in SOURCE_KINDS else "kustomize.toolkit.fluxcd.io/v1"
        event = FluxEvent(InvolvedObject(key.kind, key.namespace, key.name, api), severity, reason,
                          message, metadata={"revision": rev})
        self.events.append((f"event-{self._event_number}", event))
        self.last_event[key] = event

    def deliver_event(self, replica: Replica, index: int) -> None:
        origin, event = self.events.pop(index)
        inv = event.involved
        obj = replica.get(ObjectKey(inv.kind, inv.namespace, inv.name))
        mapping = statuses.desired_from_event(event, obj, replica.get(SRC), TEMPLATES, normalise)
        if mapping.status is not None:
            replica.enqueue([mapping.status], self.now, state_only=False, origin=origin)

    # -- resync ----------------------------------------------------------------------------------

    def resync(self, replica: Replica) -> None:
        by_commit: dict[str, list[statuses.DesiredStatus]] = defaultdict(list)
        source = replica.get(SRC)
        for key in CONSUMERS:
            obj = replica.get(key)
            desired = statuses.desired_from_object(obj, source, TEMPLATES, normalise) if obj else None
            if desired is not None:
                by_commit[desired.sha].append(desired)
        for sha, wanted in sorted(by_commit.items()):
            try:
                shown = replica.read_commit(self.gitea, sha, self.now)
            except GiteaDown:
                return
            replica.enqueue(statuses.plan_repairs(wanted, shown), self.now, state_only=True)

    # -- ancestry: does a later commit contain ours (Gitea's answer) ----------------------------

    def truth_contains(self, source: FluxObject, ours: str, held: str) -> bool:
        """Git's answer: `held` is `ours` or a descendant of it."""
        sha: str | None = held
        while sha is not None:
            if sha == ours:
                return True
            sha = self.parent.get(sha)
        return False

    def answer_ancestry(self, replica: Replica) -> None:
        """Gitea answers every question the replica asked (or fails them while it is down)."""
        for pair in sorted(replica.asking):
            if self.gitea.down:
                replica.failed[pair] = self.now + ANCESTRY_RETRY
            else:
                replica.known[pair] = self.truth_contains(self.api.latest(SRC), *pair)
        replica.asking.clear()

    # -- replicas ---------------------------------------------------------------------------------

    def restart(self, index: int) -> None:
        old = self.replicas[index]
        self.replicas[index] = Replica(old.name, self.api, old.generation + 1)
        self.restarts += 1

    def catch_up(self, replica: Replica, key: ObjectKey, whole: bool) -> None:
        latest = self.api.index(key)
        replica.view_at[key] = latest if whole else min(latest, replica.view_at[key] + 1)

    # -- what any replica answers ------------------------------------------------------------

    def views(self, accepted: Accepted) -> list[View]:
        """Every cache a GET may be answered from: each replica's (with its local outcomes if
        it follows the delivery, and its answers about history), and a fresh one that sees the
        API server and whom Gitea answers at once."""
        out = [View("api", self.api.latest, None, self.truth_contains, ())]
        for replica in self.replicas:
            followed = replica.following.get(accepted.id)
            out.append(View(replica.name, replica.get, followed.local if followed else None,
                            replica.contains(self.now), replica.ancestry_state(self.now)))
        return out

    def evaluate(self, record: DeliveryRecord, where: View) -> DeliveryView:
        objs = tuple(where.lookup(t.key) for t in record.targets)
        age = self.now - record.received
        key = (record, objs, age > TIMEOUTS.source_seconds, age > TIMEOUTS.consumer_seconds,
               tuple(sorted(where.local.items())) if where.local else (), where.name,
               where.answers)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = delivery_state.evaluate(
                record, where.lookup, self.now, TIMEOUTS, where.local, where.contains)
        return view

    def outcomes(self) -> dict[str, str]:
        """Every delivery's outcome as a fresh cache reads it."""
        return {acc.id: self.evaluate(acc.record, self.views(acc)[0]).outcome()
                for acc in self.accepted}

    # -- invariants --------------------------------------------------------------------------

    def went_to(self, record: DeliveryRecord, obj: FluxObject | None,
                source: FluxObject | None) -> set[str]:
        """Ground truth: the commits newer than ours that Flux really took this object to (or,
        for a consumer that has not attempted ours, its source) in runs begun after the push
        was received. Empty: Flux has not gone past our commit there."""
        if obj is None:
            return set()
        found = {self._went_past(record, obj)}
        if (obj.key in CONSUMERS and source is not None
                and commit_of(attempted_revision(obj)) != record.sha):
            found.add(self._went_past(record, source))
        return {sha for sha in found if sha}

    def _went_past(self, record: DeliveryRecord, obj: FluxObject) -> str:
        truth = self.api.truth(obj)
        if truth.run is None or truth.run.started < record.received - 0.001:
            return ""
        if truth.sha not in self.branch or self.order(truth.sha) <= self.order(record.sha):
            return ""
        return truth.sha

    def unexplained(self, record: DeliveryRecord, target: TargetView, lookup: Any) -> str:
        """Why a target skipped as superseded is not (truth), or "" if it is: Flux went to a
        newer commit there, and the target names that commit (field and message)."""
        newer = self.went_to(record, lookup(target.key), lookup(SRC))
        if not newer:
            return "Flux has not gone to a newer commit there since the push"
        named = target.commit or next((c for c in newer if c[:7] in target.message), "")
        if named not in newer:
            return f"it names {named[:7] or 'no commit'}, Flux went to {sorted(c[:7] for c in newer)}"
        if named[:7] not in target.message:
            return f"its message does not name {named[:7]}"
        return ""

    def check_id(self, acc: Accepted) -> None:
        """The record a GET reads from the id (on any replica: the id is all it needs)."""
        record = decode(acc.id, TOKENS[acc.record.receiver])
        check(record == acc.record, 3, f"delivery {acc.record.mark} does not read from its id")

    def check_delivery(self, acc: Accepted) -> None:
        record = acc.record  # as `check_id` read it from the id
        for where in self.views(acc):
            view = self.evaluate(record, where)
            self.check_outcome(record, view, view.outcome(), where.lookup, where.name)

    def check_outcome(self, record: DeliveryRecord, view: DeliveryView, outcome: str,
                      lookup: Any, where: str) -> None:
        who = f"delivery {record.mark} of {record.sha[:7]} (by {record.receiver}) on {where}"
        check(outcome in OUTCOMES, 3, f"{who}: unknown outcome {outcome!r}")
        if outcome == "in_progress":
            age = self.now - record.received
            check(any(not t.final for t in view.targets), 3, f"{who}: in progress with nothing left")
            check(age <= max(TIMEOUTS.source_seconds, TIMEOUTS.consumer_seconds), 3,
                  f"{who}: still in progress {age:g}s after it was received, past every time-out")
        if outcome == "ready":
            for t in view.targets:
                done = self.fetched if t.key == SRC else self.applied[t.key]
                # Ours, or (a target ready as containing ours) a later commit on the branch.
                there = record.sha in done or (t.reason == CONTAINED and any(
                    self.truth_contains(self.api.latest(SRC), record.sha, sha) for sha in done))
                check(there, 1, f"{who} is ready but Flux never "
                      f"{'fetched' if t.key == SRC else 'applied'} it on {t.key} "
                      f"(target {t.state}/{t.reason})")
        for t in view.targets:
            if t.state == SKIPPED and t.reason == SUPERSEDED:
                why = self.unexplained(record, t, lookup)
                check(not why, 1, f"{who}: {t.key} skipped as superseded, but {why} "
                      f"({t.message!r})")

    def check_all(self) -> None:
        for acc in self.accepted:
            self.check_delivery(acc)

    def check_statuses_converged(self) -> None:
        """After a settle: Gitea shows, for each consumer's current commit, what Flux last said."""
        source = self.api.latest(SRC)
        for key in CONSUMERS:
            desired = statuses.desired_from_object(self.api.latest(key), source, TEMPLATES, normalise)
            if desired is None:
                continue
            shown = self.gitea.shown.get((desired.sha, desired.context))
            check(shown is not None and shown[0] == desired.state, 5,
                  f"{key}: Gitea shows {shown} for {desired.sha[:7]}, Flux's state is "
                  f"{desired.state} ({desired.description})")
            event = self.last_event.get(key)
            if event is not None:
                said = descriptions.gitea_state(event.reason, event.severity)
                check(event.commit == desired.sha and said == desired.state, 5,
                      f"{key}: Flux last reported {said} at {event.commit}, its status reads "
                      f"{desired.state} at {desired.sha}")

    def settle(self) -> None:
        """Gitea back, every event delivered, caches caught up, queues drained, one resync."""
        self.gitea.down = False
        for index in range(len(self.events)):
            self.deliver_event(self.replicas[index % len(self.replicas)], 0)
        for replica in self.replicas:
            for key in OBJECTS:
                self.catch_up(replica, key, whole=True)
            self.reconcile(replica)
        self.drain()
        self.resync(self.replicas[0])
        self.drain()
        for acc in self.accepted:
            self.check_id(acc)

    def drain(self) -> None:
        for replica in self.replicas:
            while replica.jobs:
                replica.work(next(iter(sorted(replica.jobs))), self.gitea, self.now)
