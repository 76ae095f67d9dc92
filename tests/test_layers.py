"""The layout of the package: every import (module level or inside a function) goes to the importing module's
own layer or a lower one, and no modules import one another in a circle.

The layers, lowest first (docs/development.md explains each):

    facts     plain values and rules every layer may use
    sources   finding a model folder, checking it, its sizes, random checkpoints
    weights   reading weights into place, pinned host homes, quantized weights, LoRA files fused into weights
    pipeline  the phases of diffusers' pipelines (encode, encode_image, denoise, decode), no placement
    speedups  attention kernels, compile
    place     strategies, the planner, the machine as a Generator sees it, the loaded placement
    run       what a request runs (tasks) and the ladder over placements
    api       the Generator facade and what is built on it: pools, batches, Ray, the CLI, benchmarks
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zimage_turbo"

LAYERS: dict[str, tuple[str, ...]] = {
    "facts": (
        "_version",
        "errors",
        "model",
        "settings",
        "task_inputs",
        "request",
        "preview",
        "image_metadata",
        "result",
        "hardware",
        "json_files",
        "calibration",
        "process_state",
        "package_map",
        "quiet_imports",
        "execution",
        "failures",
        "toy_tokenizer",
        "progress",
    ),
    "sources": (
        "folder_files",
        "tokenizer_vocab",
        "folder_configs",
        "safetensors_header",
        "weight_files",
        "layout",
        "sources",
        "activation_model",
        "hub_reach",
        "hub_snapshots",
        "profile",
        "checkpoints",
        "lora_sources",
        "controlnet_sources",
    ),
    "weights": (
        "host",
        "readahead",
        "weights",
        "early_read",
        "loader",
        "converted",
        "quantize",
        "flat_quantized",
        "lora_files",
        "loras",
        "adapters",
        "controlnet",
    ),
    "pipeline": ("phases", "image_phases", "control_phases"),
    "speedups": (
        "speedups",
        "speedups.attention",
        "speedups.block_insides",
        "speedups.compile",
        "speedups.compile_advisor",
        "speedups.driver",
    ),
    "place": (
        "strategies",
        "strategies.base",
        "strategies.control_costs",
        "strategies.resident",
        "strategies.offload",
        "strategies.streaming",
        "strategies.partial_streaming",
        "strategies.residency",
        "strategies.partial",
        "strategies.multi_gpu",
        "planner",
        "machine",
        "placement",
    ),
    "run": ("tasks", "ladder"),
    "api": (
        "call_guard",
        "generator_core",
        "generator_adapters",
        "generator",
        "pool_replicas",
        "pool",
        "batch_items",
        "batch_lock",
        "batch_folder",
        "batch",
        "ray_batch",
        "bench",
        "bench.*",
        "cli_output",
        "cli_plan",
        "cli_parser",
        "cli",
        "__init__",
        "__main__",
    ),
}
ORDER = list(LAYERS)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def layer_of(name: str) -> str:
    for layer, members in LAYERS.items():
        for member in members:
            if name == member or (member.endswith(".*") and name.startswith(member[:-1])):
                return layer
    raise AssertionError(f"zimage_turbo.{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (a package's own submodules excluded)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            stem = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{stem}.{alias.name}".lstrip(".") for alias in node.names] + [stem]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zimage_turbo"):
            stem = node.module.removeprefix("zimage_turbo").lstrip(".") if node.module else ""
            targets = [f"{stem}.{alias.name}".lstrip(".") for alias in node.names] + [stem]
        elif isinstance(node, ast.Import):
            targets = [alias.name.removeprefix("zimage_turbo").lstrip(".") for alias in node.names]
        for target in targets:
            if target in known and target != name and not target.startswith(f"{name}."):
                found.add(target)
                break  # "from .x import y" is an import of x.y when that is a module, else of x
    found.discard("")
    return found


MODULES = module_names()
GRAPH = {name: imports_of(name, path, set(MODULES)) for name, path in MODULES.items()}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_to_the_same_layer_or_lower(name: str) -> None:
    here = ORDER.index(layer_of(name))
    upward = sorted(target for target in GRAPH[name] if ORDER.index(layer_of(target)) > here)
    assert not upward, f"zimage_turbo.{name} ({layer_of(name)}) imports from a higher layer: {upward}"


def test_no_import_circles() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from . import process_state\n"
        "from .errors import ZImageError\n"
        "import zimage_turbo.planner\n"
        "def later():\n"
        "    from .loader import load_pipeline  # inside a function: still an import\n"
        "    from zimage_turbo.speedups import attention\n"
    )
    known = {"process_state", "errors", "planner", "loader", "speedups", "speedups.attention"}
    assert imports_of("example", source, known) == {
        "process_state",
        "errors",
        "planner",
        "loader",
        "speedups.attention",
    }
