"""Architecture checks over the source (ast, no imports executed): imports flow one way along the data path,
pure modules stay free of I/O libraries, and background tasks are created in one place only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"

# The stages in their import order, top to bottom: a module imports from its own layer and from the layers
# below it, never from one above (docs/contributing/layout.md). A request walks ingress -> flow -> batching
# -> upstream -> providers; the relay sits above upstream because it reads the upstream's response, and
# the runtime (the app's state) between ingress, which is handed it, and the stages it holds.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("proxy.__main__", "proxy.cli", "proxy.app", "proxy.lifecycle", "proxy.admin")),
    ("operations (admin views, health)", ("proxy.ops",)),
    ("ingress", ("proxy.ingress",)),
    ("runtime", ("proxy.runtime",)),
    # The response cache wraps the flow: a miss goes on through it, a hit takes only its own limits.
    ("cache", ("proxy.cache",)),
    ("flow", ("proxy.flow",)),
    ("admission", ("proxy.admission",)),
    ("batching", ("proxy.batching",)),
    ("streaming", ("proxy.streaming",)),
    ("upstream", ("proxy.upstream",)),
    ("telemetry", ("proxy.telemetry",)),
    ("call", ("proxy.call",)),
    ("policy and providers", ("proxy.policy", "proxy.providers")),
    ("mock", ("proxy.mock",)),
    ("shared", ("proxy.errors", "proxy.tasks")),
)
STAGES = ("proxy.ingress", "proxy.flow", "proxy.admission", "proxy.batching", "proxy.streaming")
ENTRY_POINTS = LAYERS[0][1] + ("proxy.runtime",)
LOOSE_MODULES = {"proxy.__main__", "proxy.cli", "proxy.app", "proxy.lifecycle", "proxy.admin", "proxy.runtime",
                 "proxy.call", "proxy.errors", "proxy.tasks"}
"""The only modules outside a stage package: entry points, the app's state, and what every stage shares."""
IO_LIBRARIES = ("aiohttp", "asyncio", "socket", "httpx", "redis", "subprocess", "urllib.request", "uvloop")


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    type_checking: bool
    top_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_checking: bool, top_level: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for grandchild in child.body:
                yield grandchild, True, top_level
                yield from _walk(grandchild, True, top_level)
            for grandchild in child.orelse:
                yield grandchild, type_checking, top_level
                yield from _walk(grandchild, type_checking, top_level)
            continue
        inner = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield child, type_checking, inner
        yield from _walk(child, type_checking, inner)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []
    for node, type_checking, top_level in _walk(tree, False, True):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, node.lineno, type_checking, top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in MODULES else base
                found.append(Import(target, node.lineno, type_checking, top_level))
    return found


IMPORTS: dict[str, list[Import]] = {m: imports_of(m) for m in MODULES}


def within(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{MODULES[m].relative_to(ROOT)}:{imp.line} imports {imp.target}"
        for m, found in IMPORTS.items()
        if within(m, sources)
        for imp in found
        if within(imp.target, forbidden) and not within(imp.target, (m,))
    ]


def test_the_scan_sees_the_package() -> None:
    for expected in ("proxy.ingress.handler", "proxy.policy.load", "proxy.streaming.sse", "proxy.upstream.dispatch"):
        assert expected in MODULES
    assert any(i.target == "proxy.upstream.dispatch" for i in IMPORTS["proxy.ingress.handler"])
    assert any(i.target == "proxy.streaming.relay" for i in IMPORTS["proxy.ingress.handler"])


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if within(module, prefixes):
            return index
    return None


def test_every_module_is_in_a_layer() -> None:
    assert [m for m in MODULES if m != "proxy" and layer_of(m) is None] == []


def test_loose_top_level_modules_are_entry_points_or_shared() -> None:
    loose = {m for m, path in MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"}
    assert loose <= LOOSE_MODULES


def upward(imports: dict[str, list[Import]]) -> list[str]:
    found = []
    for module, imported in imports.items():
        mine = layer_of(module)
        for imp in imported:
            theirs = layer_of(imp.target) if within(imp.target, ("proxy",)) else None
            if mine is not None and theirs is not None and theirs < mine:
                found.append(f"{module}:{imp.line} ({LAYERS[mine][0]}) imports {imp.target} ({LAYERS[theirs][0]})")
    return found


def test_no_module_imports_a_layer_above_its_own() -> None:
    """Every import counts here, inside functions and under TYPE_CHECKING too: a lazy import is still a
    dependency, and a type named from above is a reach upward."""
    assert upward(IMPORTS) == []


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check fails on a stage that reaches back (guards against a check that cannot fail)."""
    back = {"proxy.upstream.dispatch": [Import("proxy.ingress.handler", 7, True, False)]}
    assert upward(back) == ["proxy.upstream.dispatch:7 (upstream) imports proxy.ingress.handler (ingress)"]
    assert upward({"proxy.ingress.handler": [Import("proxy.upstream.dispatch", 7, False, True)]}) == []


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        # The relay moves bytes; it does not dispatch (it reads the upstream's body helpers, nothing more).
        (("proxy.streaming",), ("proxy.upstream.dispatch", "proxy.upstream.client", "proxy.upstream.registry")),
        # Policy and providers are compiled data and pure translation: neither imports a stage, nor I/O code.
        (("proxy.policy", "proxy.providers"), ("proxy.upstream", "proxy.telemetry") + STAGES + ENTRY_POINTS),
        # The mock upstream is a separate server: it shares nothing with the proxy's data path.
        (
            ("proxy.mock",),
            STAGES + ENTRY_POINTS + ("proxy.policy", "proxy.upstream"),
        ),
    ],
    ids=["relay", "policy-providers", "mock"],
)
def test_imports_flow_one_way(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    assert violations(sources, forbidden) == []


def test_sse_codec_imports_nothing_from_proxy() -> None:
    assert [i.target for i in IMPORTS["proxy.streaming.sse"] if within(i.target, ("proxy",))] == []


MOCK_BUILDERS = ("proxy.mock.content", "proxy.mock.structured", "proxy.mock.chat", "proxy.mock.responses",
                 "proxy.mock.messages", "proxy.mock.embeddings", "proxy.mock.faults")


@pytest.mark.parametrize("module", MOCK_BUILDERS)
def test_the_mock_builds_bodies_without_io(module: str) -> None:
    """The mock's protocol modules are pure: only proxy.mock.server and its helpers touch aiohttp."""
    assert [i.target for i in IMPORTS[module] if within(i.target, IO_LIBRARIES)] == []


def test_production_code_loads_the_mock_only_when_a_mock_upstream_starts() -> None:
    """Outside proxy.mock, the mock is imported inside a function (or for type checking), never at load."""
    eager = [
        f"{MODULES[m].relative_to(ROOT)}:{i.line} imports {i.target}"
        for m, found in IMPORTS.items()
        if not within(m, ("proxy.mock",))
        for i in found
        if within(i.target, ("proxy.mock",)) and i.top_level and not i.type_checking
    ]
    assert eager == []
    lazy = {m for m, found in IMPORTS.items() if not within(m, ("proxy.mock",))
            and any(within(i.target, ("proxy.mock",)) for i in found)}
    assert lazy == {"proxy.cli", "proxy.upstream.client"}


def test_only_the_cli_imports_the_app() -> None:
    importers = sorted(m for m, found in IMPORTS.items() if any(i.target == "proxy.app" for i in found))
    assert importers == ["proxy.cli"]


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if within(m, ("proxy.providers", "proxy.streaming.sse")))
)
def test_pure_modules_do_no_io(module: str) -> None:
    assert [i.target for i in IMPORTS[module] if within(i.target, IO_LIBRARIES)] == []


def test_module_imports_have_no_cycles() -> None:
    graph = {
        m: {
            i.target
            for i in found
            if i.top_level and not i.type_checking and i.target in MODULES and i.target != m
        }
        for m, found in IMPORTS.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def _task_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (
            func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        )
        if name in ("create_task", "ensure_future"):
            yield node


def test_tasks_are_created_only_in_proxy_tasks() -> None:
    offenders = []
    for module, path in MODULES.items():
        if module == "proxy.tasks":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        offenders += [f"{path.relative_to(ROOT)}:{call.lineno}" for call in _task_calls(tree)]
        for node in ast.walk(tree):  # `from asyncio import create_task` would hide the call's origin
            if isinstance(node, ast.ImportFrom) and node.module == "asyncio":
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}"
                    for a in node.names
                    if a.name in ("create_task", "ensure_future")
                ]
    assert offenders == []
    assert list(_task_calls(ast.parse(MODULES["proxy.tasks"].read_text())))  # the checker does see calls


@pytest.mark.parametrize("name", ["proxy.flow.board", "proxy.flow.estimate", "proxy.flow.shed"])
def test_the_flow_decisions_are_pure(name: str) -> None:
    """The order, the estimate and the shedding rule are decisions over plain data: no I/O, no stage."""
    runtime_imports = [i.target for i in IMPORTS[name] if not i.type_checking]
    assert not [t for t in runtime_imports if within(t, IO_LIBRARIES)]
    assert not [t for t in runtime_imports if within(t, STAGES + ENTRY_POINTS + ("proxy.upstream",))
                and not within(t, ("proxy.flow.board", "proxy.admission.limits"))]
