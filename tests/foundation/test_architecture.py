"""The house as the folders show it: every import runs down the parts, never up or across.

An AST walk over `receiver/` (every import, including those inside functions). The parts,
lowest first, and the rules are the ones `docs/architecture.md` draws.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

RECEIVER = Path(__file__).resolve().parent.parent.parent / "receiver"

# Lowest first: a module may import its own part and any lower one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("foundation",),  # config, signatures, metrics, logs, templates, giturls
    ("flux", "gitea"),  # Flux's objects and the cluster port; Gitea's payloads and client
    ("push",),  # intake decisions: which objects a push touches
    ("delivery",),  # records, marks, state, the reconcile loop
    ("status",),  # statuses: decisions and their shell
    ("demo", "doctor"),  # the simulated Flux; the `doctor` command's checks
    ("web",),  # the HTTP face
    ("cli",),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
# The shell that talks to the outside: nothing pure may import these.
ADAPTERS = frozenset({"receiver.flux.kube", "receiver.flux.memory", "receiver.gitea.client"})
CORE = frozenset({
    "receiver.templates", "receiver.giturls", "receiver.signatures",
    "receiver.flux.objects", "receiver.flux.revisions", "receiver.flux.origin",
    "receiver.flux.store", "receiver.gitea.payloads", "receiver.gitea.version",
    "receiver.gitea.package_payloads", "receiver.gitea.ref_payloads", "receiver.gitea.api_types",
    "receiver.push.selector", "receiver.push.routing", "receiver.push.package_routing",
    "receiver.push.resources", "receiver.push.semver", "receiver.push.image_policy",
    "receiver.push.mismatch", "receiver.push.spec_events",
    "receiver.delivery.record", "receiver.delivery.marks", "receiver.delivery.state",
    "receiver.status.decisions", "receiver.status.fleet", "receiver.status.badges",
    "receiver.status.flux_events", "receiver.doctor.facts", "receiver.doctor.checks",
    "receiver.flux.event_book", "receiver.push.push_events",
    "receiver.status.canaries", "receiver.status.gates",
    "receiver.flux.canary", "receiver.delivery.canary_wait",
})


def module_name(path: Path) -> str:
    parts = path.relative_to(RECEIVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and (RECEIVER / parts[1]).is_dir()):
        return parts[1]
    return "cli" if module == "receiver.cli" else "foundation"


def imports() -> dict[str, set[str]]:
    """module -> the receiver modules it imports (a package import counts as its __init__)."""
    known = {module_name(p) for p in RECEIVER.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in RECEIVER.rglob("*.py"):
        here = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name in known and name != "receiver" and name != here:
                    graph[here].add(name)
        graph.setdefault(here, set())
    return graph


def test_every_module_belongs_to_a_known_part() -> None:
    unknown = {m: part_of(m) for m in imports() if part_of(m) not in RANK}
    assert not unknown, f"modules outside the parts docs/architecture.md names: {unknown}"


def test_no_part_imports_a_higher_one() -> None:
    upward = sorted(
        f"{module} ({part_of(module)}) imports {target} ({part_of(target)})"
        for module, targets in imports().items() for target in targets
        if RANK[part_of(target)] > RANK[part_of(module)])
    assert not upward, "\n".join(upward)


def test_the_flux_and_gitea_adapters_never_import_each_other() -> None:
    crossing = sorted(
        f"{module} imports {target}" for module, targets in imports().items()
        for target in targets
        if {part_of(module), part_of(target)} == {"flux", "gitea"})
    assert not crossing, "\n".join(crossing)


def test_the_core_imports_no_adapter_and_no_web_face() -> None:
    graph = imports()
    assert graph.keys() >= CORE, sorted(CORE - graph.keys())
    bad = sorted(f"{module} imports {target}" for module in CORE for target in graph[module]
                 if target in ADAPTERS or part_of(target) == "web")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target] if target in path
                              else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
