"""The whole system (`tests/system_model.py`) under a hypothesis state machine.

After every step the bridge's answers, computed by the real core functions, are checked
against what really happened in the model, on every cache a GET may be answered from (each
replica's, lagging or not, and a fresh one):

1. A delivery is `ready` only when Flux really fetched (source) or applied (consumer) the
   pushed commit on every target it follows, or, for a target ready as containing ours, a
   commit that contains it. A target skipped as `Superseded` is one where Flux went to a
   commit made after ours (on it, or for a consumer that has not attempted ours, on its
   source) in a run begun after the push was received, and it names that commit.
2. A patch that carries only marks of pushes of commit S (a repeat through any Receiver, on
   any replica) never ends a delivery of S that was in progress, unless Flux really went past
   S there (invariant 1's superseded).
3. Every accepted push reads back from its id, whatever restarted; its outcome is one of the
   known ones; `in_progress` names a target still open, and no delivery is still in
   progress once every time-out has passed.
4. One (object, push) pair is patched at most once across replicas within the request's
   window; a request refused because its mark was on the objects is never accepted by a
   replica whose cache has caught up with that refusal, nor one refused by a replica's
   memory by that replica, whatever other pushes arrive.
5. Once everything settles (events delivered, caches caught up, Gitea up, queues drained and
   a resync run), Gitea shows for each consumer's current commit the state of Flux's live
   status, which is the state of the last event Flux sent for it.

`run_model` runs the machine and counts examples and steps (shown in the `summaries` section
of the pytest output); the mutation tests break one guard of the core at a time and expect
the model to catch it with the invariant that guard holds. Strict xfails pin gaps the model
found in the code as it is (see their reasons).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as with_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from receiver.delivery import state as delivery_state
from receiver.delivery.view import DeliveryView, Timeouts
from receiver.status import decisions as statuses
from tests import system_model as model
from tests.system_model import ACTIONS, GITEA, OBJECTS, RECEIVERS, SRC, System, Violation

REPLICAS = 3
TIMEOUTS_PAST = model.TIMEOUTS.consumer_seconds + 1
# What the suite runs: fixed sizes, no database, any seed (see `run_model`).
MAX_EXAMPLES = 60
STEPS = 40
# The most pushes one flood sends: past the lowered bounds of the marks (`SMALL_BOUNDS`).
FLOOD = 24
# A mutation run stops at the first violation; this bounds a run that finds none.
MUTATION_EXAMPLES = 1000


@dataclass
class Counts:
    """Examples and steps a run took, and when the first violation showed up."""

    examples: int = 0
    steps: int = 0
    first_failure: tuple[int, int, int] | None = None  # (examples, steps, step in example)
    message: str = ""
    in_example: int = 0  # steps (rules) of the example under way, checked
    checking: bool = False  # in the after-step check, else in a step
    shrunk: list[str] = field(default_factory=list)


COUNTS = Counts()


class SystemMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.system = System(REPLICAS)
        self.started = False
        COUNTS.examples += 1
        COUNTS.in_example = 0

    # -- Git and pushes --------------------------------------------------------------------

    @rule(force=st.booleans())
    def git_commit(self, force: bool) -> None:
        self.system.new_commit(force)

    @rule(receiver=st.sampled_from(RECEIVERS), back=st.integers(0, 1),
          replica=st.integers(0, REPLICAS - 1), wait=st.sampled_from([0.0, 0.4, 2.0]),
          send_now=st.booleans())
    def push(self, receiver: str, back: int, replica: int, wait: float, send_now: bool) -> None:
        """A new request for the head or a recent commit."""
        system = self.system
        system.advance(wait)
        sha = system.on_branch(back)
        self._send(system.request(receiver, sha), replica, send_now)

    @rule(receiver=st.sampled_from(RECEIVERS), replica=st.integers(0, REPLICAS - 1))
    def force_push(self, receiver: str, replica: int) -> None:
        """The head replaced by an amended commit (git push --force), and its hook."""
        self._send(self.system.request(receiver, self.system.new_commit(force=True)), replica,
                   send_now=True)

    @precondition(lambda self: self.system.accepted)
    @rule(receiver=st.sampled_from(RECEIVERS), replica=st.integers(0, REPLICAS - 1),
          wait=st.sampled_from([0.0, 0.4, 2.0]), send_now=st.booleans())
    def repeat_commit(self, receiver: str, replica: int, wait: float, send_now: bool) -> None:
        """A new request for the commit of the latest accepted push (a CI step and Gitea's
        own webhook for the same commit, a retried job)."""
        system = self.system
        system.advance(wait)
        sha = system.accepted[-1].record.sha
        self._send(system.request(receiver, sha), replica, send_now)

    @precondition(lambda self: self.system.requests)
    @rule(which=st.integers(0, 1000), replica=st.integers(0, REPLICAS - 1),
          wait=st.sampled_from([0.0, 1.0, 60.0]), send_now=st.booleans())
    def resend(self, which: int, replica: int, wait: float, send_now: bool) -> None:
        """The same request again: a captured one-time push replayed, a Gitea redelivery."""
        system = self.system
        system.advance(wait)
        req = system.requests[which % len(system.requests)]
        self._send(req, replica, send_now)

    @rule(count=st.integers(1, FLOOD), replica=st.integers(0, REPLICAS - 1),
          receiver=st.sampled_from(RECEIVERS))
    def flood(self, count: int, replica: int, receiver: str) -> None:
        """Many pushes of new commits through one Receiver, sent in one coalesced patch."""
        system = self.system
        for _ in range(count):
            system.advance(0.01)
            system.send(system.replicas[replica], system.request(receiver, system.new_commit()))
        self._flush(replica, SRC)

    def _send(self, req: model.Request, replica: int, send_now: bool) -> None:
        system = self.system
        system.send(system.replicas[replica], req)
        if send_now:
            self._flush(replica, SRC)

    # -- patches and the reconcile loop ------------------------------------------------------

    @rule(replica=st.integers(0, REPLICAS - 1), key=st.sampled_from(OBJECTS))
    def flush(self, replica: int, key: model.ObjectKey) -> None:
        self._flush(replica, key)

    def _flush(self, replica: int, key: model.ObjectKey) -> None:
        """A patch, and invariant 2 on what it changed."""
        system = self.system
        before = system.outcomes()
        written = system.flush(system.replicas[replica], key)
        commits = {system.by_mark[m].record.sha for m in written}
        if len(commits) != 1:
            return
        (sha,) = commits
        after = system.outcomes()
        for acc in system.accepted:
            if acc.record.sha != sha or before.get(acc.id) != "in_progress":
                continue
            outcome = after[acc.id]
            if outcome == "in_progress":
                continue
            view = system.evaluate(acc.record, system.views(acc)[0])
            explained = outcome == "superseded" and not any(
                system.unexplained(acc.record, t, system.api.latest)
                for t in view.targets if t.state == model.SKIPPED)
            model.check(explained, 2,
                        f"a patch of {key} with only marks of pushes of {sha[:7]} "
                        f"({', '.join(written)}) ended delivery {acc.record.mark} of the same "
                        f"commit as {outcome}: "
                        + "; ".join(f"{t.key.name} {t.state}/{t.reason}" for t in view.targets))

    @rule(replica=st.integers(0, REPLICAS - 1))
    def reconcile(self, replica: int) -> None:
        self.system.reconcile(self.system.replicas[replica])

    @rule(replica=st.integers(0, REPLICAS - 1), key=st.sampled_from(OBJECTS), whole=st.booleans())
    def watch(self, replica: int, key: model.ObjectKey, whole: bool) -> None:
        self.system.catch_up(self.system.replicas[replica], key, whole)

    @rule(replica=st.integers(0, REPLICAS - 1))
    def restart(self, replica: int) -> None:
        self.system.restart(replica)

    @rule(seconds=st.sampled_from([0.4, 1.0, 5.0, 30.0, 301.0, 901.0]))
    def tick(self, seconds: float) -> None:
        self.system.advance(seconds)

    # -- Flux ----------------------------------------------------------------------------------

    @rule(key=st.sampled_from(OBJECTS))
    def flux_start(self, key: model.ObjectKey) -> None:
        self.system.flux_start(key)

    @rule(key=st.sampled_from(OBJECTS), ok=st.booleans())
    def flux_finish(self, key: model.ObjectKey, ok: bool) -> None:
        self.system.flux_finish(key, ok)

    @rule(key=st.sampled_from(OBJECTS), ok=st.booleans())
    def flux_run(self, key: model.ObjectKey, ok: bool) -> None:
        """A whole run at once (when nothing happens while it runs)."""
        if self.system.flux_start(key):
            self.system.flux_finish(key, ok)

    # -- events, statuses and Gitea ------------------------------------------------------------

    @precondition(lambda self: self.system.events)
    @rule(which=st.integers(0, 100), replica=st.integers(0, REPLICAS - 1), lost=st.booleans())
    def flux_event(self, which: int, replica: int, lost: bool) -> None:
        system = self.system
        index = which % len(system.events)
        if lost:
            system.events.pop(index)
        else:
            system.deliver_event(system.replicas[replica], index)

    @rule(replica=st.integers(0, REPLICAS - 1), which=st.integers(0, 100))
    def status_job(self, replica: int, which: int) -> None:
        target = self.system.replicas[replica]
        if target.jobs:
            keys = sorted(target.jobs)
            target.work(keys[which % len(keys)], self.system.gitea, self.system.now)

    @rule(down=st.booleans())
    def gitea_availability(self, down: bool) -> None:
        self.system.gitea.down = down

    @rule(replica=st.integers(0, REPLICAS - 1))
    def ancestry(self, replica: int) -> None:
        """Gitea answers the replica's questions about history (or fails them, if down)."""
        self.system.answer_ancestry(self.system.replicas[replica])

    @rule(replica=st.integers(0, REPLICAS - 1))
    def resync(self, replica: int) -> None:
        self.system.resync(self.system.replicas[replica])

    @rule()
    def settle(self) -> None:
        self.system.settle()
        self.system.check_statuses_converged()

    # -- after every step -------------------------------------------------------------------------

    @invariant()
    def holds(self) -> None:
        if self.started:  # not the check before the first step
            COUNTS.steps += 1
            COUNTS.in_example += 1
        self.started = True
        COUNTS.checking = True
        self.system.check_all()
        COUNTS.checking = False


class RepeatsOnly(SystemMachine):
    """One new commit, pushed as often as it likes: every later mark is a repeat of the same
    commit (the incident's shape), so what breaks invariant 2 shows as invariant 2."""

    @precondition(lambda self: len(self.system.branch) < 2)
    @rule()
    def git_commit(self) -> None:  # type: ignore[override]
        self.system.new_commit()

    @rule(receiver=st.sampled_from(RECEIVERS), replica=st.integers(0, REPLICAS - 1),
          wait=st.sampled_from([0.0, 0.4, 2.0]), send_now=st.booleans())
    def push(self, receiver: str, replica: int, wait: float, send_now: bool) -> None:  # type: ignore[override]
        self.system.advance(wait)
        self._send(self.system.request(receiver, self.system.head), replica, send_now)

    @precondition(lambda self: False)
    @rule()
    def flood(self) -> None:  # type: ignore[override]
        """No floods of new commits here."""


def model_settings(max_examples: int = MAX_EXAMPLES, steps: int = STEPS, shrink: bool = True) -> settings:
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if shrink:
        phases.append(Phase.shrink)
    return settings(max_examples=max_examples, stateful_step_count=steps, deadline=None,
                    database=None, derandomize=False, phases=phases, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@dataclass
class Result:
    counts: Counts
    error: BaseException | None
    seconds: float


# The marks annotation's bounds, lowered so that a flood of a few dozen pushes reaches them
# (the same code path as 512 per Receiver and 2,048 per object, in reach of 40 steps).
SMALL_BOUNDS = {"PER_OWNER": 12, "MAX_ENTRIES": 20}


@contextmanager
def small_mark_bounds() -> Iterator[None]:
    marks = model.delivery_marks
    saved = {name: getattr(marks, name) for name in SMALL_BOUNDS}
    for name, value in SMALL_BOUNDS.items():
        setattr(marks, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(marks, name, value)


def run_model(max_examples: int = MAX_EXAMPLES, steps: int = STEPS, seed: int | None = None,
              shrink: bool = True, machine: Any = SystemMachine) -> Result:
    """Run the machine; the counts of examples and steps, and the violation if one was found."""
    global COUNTS
    COUNTS = Counts()

    def first(message: str) -> None:
        if COUNTS.first_failure is None:
            extra = 0 if COUNTS.checking else 1  # a violation found within a step
            COUNTS.first_failure = (COUNTS.examples, COUNTS.steps + extra,
                                    COUNTS.in_example + extra)
            COUNTS.message = message

    model.on_violation.append(first)
    started = time.perf_counter()
    error: BaseException | None = None
    if seed is not None:
        machine = with_seed(seed)(machine)
    try:
        with small_mark_bounds():
            run_state_machine_as_test(machine, settings=model_settings(max_examples, steps, shrink))
    except Violation as exc:
        error = exc
        COUNTS.shrunk = [n for n in getattr(exc, "__notes__", []) if n.startswith("state.")]
    finally:
        model.on_violation.remove(first)
    return Result(COUNTS, error, time.perf_counter() - started)


# -- the suite's run ----------------------------------------------------------------------------


def test_the_system_model_holds(record_property: Any) -> None:
    result = run_model()
    counts = result.counts
    found = ""
    if counts.first_failure is not None:
        examples, steps, step = counts.first_failure
        found = f"; first violation in example {examples}, step {step} ({steps} steps in all)"
    record_property("summary", f"system model: {counts.examples} examples, {counts.steps} steps "
                    f"in {result.seconds:.1f}s{found}")
    if result.error is not None:
        raise result.error


def test_a_repeat_of_the_commit_through_another_receiver_is_not_deployed() -> None:
    """The incident, step by step: a CI step pushes commit S through the actions Receiver,
    Gitea's own webhook for S arrives 0.4 s later through the gitea Receiver, both marks go
    out in one patch; Flux has fetched nothing. The first push must not read as deployed."""
    machine = SystemMachine()
    machine.git_commit(force=False)
    machine.push(receiver=ACTIONS, back=0, replica=0, wait=0.0, send_now=False)
    machine.repeat_commit(receiver=GITEA, replica=1, wait=0.4, send_now=False)
    machine.flush(replica=0, key=SRC)
    machine.flush(replica=1, key=SRC)
    machine.holds()
    system = machine.system
    first, second = system.accepted
    assert system.fetched == {system.branch[0]}
    assert system.outcomes() == {first.id: "in_progress", second.id: "in_progress"}


def test_a_replay_refused_by_the_marks_is_refused_by_a_lagging_replica_too() -> None:
    system = System(REPLICAS)
    request = system.request(ACTIONS, system.new_commit())
    first, lagging, fresh = system.replicas
    assert system.send(first, request) == "accepted"
    assert system.flush(first, SRC) == [request.mark]
    system.catch_up(fresh, SRC, whole=True)
    assert system.send(fresh, request) == "replayed"
    assert system.send(lagging, request) == "replayed"


def test_a_timed_out_push_does_not_stay_pending_after_gitea_comes_back() -> None:
    """A push's `pending` still queued (Gitea down, retrying) when the push times out is
    replaced by the outcome, never posted after it."""
    system = System(REPLICAS)
    replica = system.replicas[0]
    sha = system.new_commit()
    assert system.send(replica, system.request(GITEA, sha)) == "accepted"
    (key,) = [k for k in replica.jobs if k[1].endswith("/apps")]
    system.gitea.down = True
    replica.work(key, system.gitea, system.now)  # fails: retried later
    system.advance(TIMEOUTS_PAST)  # the patch never went out: the push times out
    system.reconcile(replica)
    assert system.outcomes() == {system.accepted[0].id: "timed_out"}
    system.gitea.down = False
    system.drain()
    assert system.gitea.shown[key][0] != "pending"


def test_a_consumer_that_has_not_moved_is_not_superseded() -> None:
    """Two pushes of new commits c1 and c2 in one patch; the source fetches c2 (which contains
    c1: c1's source is ready, containing it); both deliveries then annotate `apps`, which still
    holds c0 from before either push. c1's `apps` has not moved: it must not read superseded
    "by" c0 (Flux is about to apply c2, which contains c1)."""
    machine = SystemMachine()
    machine.flood(count=2, replica=0, receiver=GITEA)
    machine.flux_run(key=SRC, ok=True)
    machine.settle()
    machine.flush(replica=0, key=model.APPS)
    machine.holds()


def test_a_push_flux_never_fetched_is_not_shown_as_skipped() -> None:
    system = System(REPLICAS)
    replica = system.replicas[0]
    sha = system.new_commit()
    assert system.send(replica, system.request(GITEA, sha)) == "accepted"
    assert system.flush(replica, SRC)
    system.advance(TIMEOUTS_PAST)  # Flux never runs: the source stays at the commit before
    system.reconcile(replica)
    assert system.outcomes() == {system.accepted[0].id: "timed_out"}
    system.drain()
    shown = {ctx: fields[0] for (commit_, ctx), fields in system.gitea.shown.items()
             if commit_ == sha}
    assert shown and "skipped" not in shown.values(), shown


# -- mutations: each guard broken on purpose must make the model fail ----------------------------


def _outcome_counting_skipped_as_ready(self: DeliveryView) -> str:
    states = {t.state for t in self.targets}
    if "failed" in states:
        return "failed"
    if not self.final:
        return "in_progress"
    return "timed_out" if "timed_out" in states else "ready"


def _held_elsewhere_unguarded(record: Any, obj: Any) -> str | None:
    """Without the guard of "not moved yet": whatever the object holds, if not ours, counts
    as where it moved to (the old rule's mistake)."""
    return delivery_state._holds_other(obj, record.sha)


def _source_without_timeout(original: Any) -> Any:
    def source(*args: Any) -> Any:
        never = Timeouts(float("inf"), float("inf"))
        return original(*(never if isinstance(a, Timeouts) else a for a in args))
    return source


def _merge_evicting(current: Any, new: Any, now: float, keep_seconds: float) -> Any:
    """Before the fix: the new marks first, then the current ones, cut at the bound (32 then;
    `MAX_ENTRIES` here), evicting the oldest."""
    marks = model.delivery_marks
    bound = marks.MAX_ENTRIES
    out: list[Any] = []
    seen: set[str] = set()
    for entry in [*sorted(new, key=lambda m: -m.at), *marks.of(current)]:
        if entry.mark not in seen and now - entry.at <= keep_seconds:
            seen.add(entry.mark)
            out.append(entry)
    written = tuple(m for m in out[:bound] if m in new)
    return marks.Merge(" ".join(f"{m.mark}@{m.at:.3f}" for m in out[:bound]), written, ())


def _needs_post_if_nothing_shown(shown: Any, wanted: Any, *, state_only: bool) -> bool:
    return shown is None


# name: (the invariants it may break, where the guard lives, the broken guard, the machine).
# Invariant 2 is invariant 1 seen through a repeat's patch: a false verdict that such a
# patch brings about shows as 2, one that shows up some other way first as 1.
MUTATIONS: dict[str, tuple[tuple[int, ...], Any, str, Any, Any]] = {
    "outcome counts skipped targets as ready": (
        (1, 2), DeliveryView, "outcome", _outcome_counting_skipped_as_ready, SystemMachine),
    "moved past: any other commit held counts, handled or not (the old rule)": (
        (2, 1), delivery_state, "held_elsewhere", _held_elsewhere_unguarded, RepeatsOnly),
    "a source never times out": (
        (3,), delivery_state, "_source", _source_without_timeout(delivery_state._source),
        SystemMachine),
    "the marks annotation evicts its oldest entries past its bound": (
        (4,), model.delivery_marks, "merge", _merge_evicting, SystemMachine),
    "a status is posted only when Gitea shows none for its context": (
        (5,), statuses, "needs_post", _needs_post_if_nothing_shown, SystemMachine),
}


@contextmanager
def mutated(name: str) -> Iterator[tuple[int, ...]]:
    numbers, owner, attribute, replacement, _ = MUTATIONS[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield numbers
    finally:
        setattr(owner, attribute, original)


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_broken_guard_is_caught(name: str, record_property: Any) -> None:
    with mutated(name) as numbers:
        result = run_model(max_examples=MUTATION_EXAMPLES, shrink=False,
                           machine=MUTATIONS[name][4])
    counts = result.counts
    assert result.error is not None and counts.first_failure is not None, (
        f"the model did not catch the mutation in {counts.examples} examples: {name}")
    examples, steps, step = counts.first_failure
    record_property("summary", f"mutation '{name}': caught in example {examples}, step {step} "
                    f"({steps} steps in all): {counts.message[:100]}")
    assert counts.message.startswith(tuple(f"invariant {n}:" for n in numbers)), counts.message
