"""Flagger's Canary as the cache holds it: the workload it targets, the Flux object that
applied that workload (from Flux's labels), and its phases. Pure."""

from __future__ import annotations

from receiver.flux.objects import WORKLOAD_KINDS, FluxObject, ObjectKey
from receiver.times import epoch_seconds

# The labels Flux's controllers put on every object they apply.
OWNER_LABELS: dict[str, tuple[str, str]] = {
    "Kustomization": ("kustomize.toolkit.fluxcd.io/name", "kustomize.toolkit.fluxcd.io/namespace"),
    "HelmRelease": ("helm.toolkit.fluxcd.io/name", "helm.toolkit.fluxcd.io/namespace"),
}

PROGRESSING, WAITING_PROMOTION, SUCCEEDED, FAILED = (
    "Progressing", "WaitingPromotion", "Succeeded", "Failed")
PHASES = ("Initializing", "Initialized", "Waiting", PROGRESSING, WAITING_PROMOTION, "Promoting",
          "Finalising", SUCCEEDED, FAILED, "Terminating", "Terminated")
FINAL_PHASES = frozenset({SUCCEEDED, FAILED, "Initialized"})
GONE_PHASES = frozenset({"Terminating", "Terminated"})
# The field managers Flux's controllers apply a commit with (their controller names).
FLUX_MANAGERS = frozenset({"kustomize-controller", "helm-controller"})


def target_of(canary: FluxObject) -> ObjectKey | None:
    """The workload a Canary's `spec.targetRef` names (always in the Canary's namespace), if it
    is a kind Flagger rolls out and the bridge caches."""
    ref = canary.spec.get("targetRef")
    if not isinstance(ref, dict):
        return None
    kind, name = ref.get("kind"), ref.get("name")
    if kind not in WORKLOAD_KINDS or not isinstance(name, str) or not name:
        return None
    return ObjectKey(str(kind), canary.namespace, name)


def owner_of(workload: FluxObject) -> ObjectKey | None:
    """The Kustomization or HelmRelease that applied a workload, from Flux's labels. Should a
    workload carry both, the HelmRelease's win: helm-controller labels what it installs, a
    Kustomization labels the HelmRelease object itself, not the chart's workloads."""
    labels = workload.labels
    found: list[ObjectKey] = []
    for kind in ("HelmRelease", "Kustomization"):
        name_label, namespace_label = OWNER_LABELS[kind]
        name, namespace = labels.get(name_label), labels.get(namespace_label)
        if name and namespace:
            found.append(ObjectKey(kind, namespace, name))
    return found[0] if found else None


def phase_changed_at(canary: FluxObject) -> str:
    """When Flagger last changed the canary's phase (RFC 3339; "" if it does not say).

    `status.lastTransitionTime` will not do: Flagger rewrites it on every status write (weight,
    iterations, a resync of the same phase). Its `Promoted` condition changes only with the
    phase (its reason), and its `lastUpdateTime` says when."""
    for cond in canary.status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Promoted":
            for field in ("lastUpdateTime", "lastTransitionTime"):
                value = cond.get(field)
                if isinstance(value, str) and value:
                    return value
    value = canary.status.get("lastTransitionTime")
    return value if isinstance(value, str) else ""


def workload_changed_at(workload: FluxObject) -> str:
    """When a Flux controller last changed the workload itself (RFC 3339; "" if it does not
    say): the API server stamps a field manager's `managedFields` entry only when that manager
    changes a field, so an apply that changed nothing leaves it as it was. Only Flux applies
    commits; Flagger scaling its target, status and scale updates are not counted."""
    latest, latest_at = "", float("-inf")
    for entry in workload.metadata.get("managedFields") or []:
        if not isinstance(entry, dict) or entry.get("subresource") or \
                entry.get("manager") not in FLUX_MANAGERS:
            continue
        value = entry.get("time")
        at = epoch_seconds(value) if isinstance(value, str) else None
        if at is not None and at > latest_at:
            latest, latest_at = str(value), at
    return latest


def phase_set_after(canary: FluxObject, moment: float) -> bool:
    """Did Flagger set the canary's phase surely after `moment` (unix seconds)? Kubernetes
    stamps whole seconds, a stamp S meaning some time in [S, S + 1): only S >= `moment` is
    surely after it. For a moment that is itself such a stamp M, ask about M + 1: a phase set
    in the same second may be from before it. Unknown time: no."""
    changed = epoch_seconds(phase_changed_at(canary))
    return changed is not None and changed >= moment


def workload_seen(canary: FluxObject, workload: FluxObject) -> bool:
    """Has Flagger changed the canary's phase since the workload was last changed? Then its
    phase is about the workload as it is. Strictly after: in the same second Flagger may have
    looked just before the change. Unknown times: no."""
    changed = epoch_seconds(workload_changed_at(workload))
    return changed is not None and phase_set_after(canary, int(changed) + 1)
