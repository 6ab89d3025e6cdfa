"""CI tier checks of the pack as ComfyUI and ComfyUI-Manager see it, without a host."""

from __future__ import annotations

import ast
import glob
import importlib.util
import json
import os
import re
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schema_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Schema":
            yield node


def _shared_inputs() -> dict[str, ast.Call]:
    """nodes/training_inputs.py: each function's returned ``io.X.Input(...)`` call, by function name."""
    tree = ast.parse(open(os.path.join(ROOT, "nodes", "training_inputs.py")).read())
    return {
        f.name: r.value
        for f in tree.body
        if isinstance(f, ast.FunctionDef)
        for r in ast.walk(f)
        if isinstance(r, ast.Return) and isinstance(r.value, ast.Call)
    }


def node_schemas() -> list[dict]:
    """Every ``io.Schema(...)`` in nodes/, read from the source: node_id, category expression, description,
    and the inputs with whether each has a tooltip (``inputs.<name>(...)`` read from nodes/training_inputs.py)."""
    shared = _shared_inputs()
    schemas = []
    for path in sorted(glob.glob(os.path.join(ROOT, "nodes", "*.py"))):
        tree = ast.parse(open(path).read())
        for call in _schema_calls(tree):
            kw = {k.arg: k.value for k in call.keywords}
            inputs = []
            for item in getattr(kw.get("inputs"), "elts", []):
                if isinstance(item, ast.Call):
                    if isinstance(item.func, ast.Attribute) and ast.unparse(item.func.value) == "inputs":
                        item = shared[item.func.attr]
                    item_kw = {k.arg: k.value for k in item.keywords}
                    name = item.args[0].value if item.args and isinstance(item.args[0], ast.Constant) else "?"
                    inputs.append({"name": name, "tooltip": "tooltip" in item_kw})
            outputs = [
                item.args[0].value
                for item in getattr(kw.get("outputs"), "elts", [])
                if isinstance(item, ast.Call) and item.args and isinstance(item.args[0], ast.Constant)
            ]
            schemas.append(
                {
                    "file": os.path.basename(path),
                    "node_id": kw["node_id"].value,
                    "category": ast.unparse(kw["category"]) if "category" in kw else None,
                    "description": "description" in kw,
                    "display_name": "display_name" in kw,
                    "inputs": inputs,
                    "outputs": outputs,
                }
            )
    return schemas


def test_every_node_schema_is_complete():
    schemas = node_schemas()
    assert schemas, "no nodes found"
    for schema in schemas:
        assert schema["node_id"].startswith("VAELab_"), schema["node_id"]
        assert schema["category"] == "CATEGORY", (
            f"{schema['node_id']}: category must be the shared CATEGORY ('VAE Lab')"
        )
        ids = [i["name"] for i in schema["inputs"]] + schema["outputs"]
        assert len(ids) == len(set(ids)), (
            f"{schema['node_id']}: input and output ids must be unique (the host refuses the node)"
        )
        assert schema["description"] and schema["display_name"], schema["node_id"]
        for item in schema["inputs"]:
            assert item["tooltip"], f"{schema['node_id']}.{item['name']} has no tooltip"
        assert os.path.isfile(os.path.join(ROOT, "web", "docs", f"{schema['node_id']}.md")), (
            f"{schema['node_id']}: no help page"
        )


def test_every_node_has_an_example_workflow_and_workflows_are_ui_format():
    used = set()
    for path in glob.glob(os.path.join(ROOT, "example_workflows", "*.json")):
        workflow = json.load(open(path))
        assert "nodes" in workflow and "links" in workflow, f"{path}: not UI format"
        assert any(n["type"] in ("Note", "MarkdownNote") for n in workflow["nodes"]), (
            f"{path}: add a note on using your own files"
        )
        used |= {n["type"] for n in workflow["nodes"]}
    missing = {s["node_id"] for s in node_schemas()} - used
    assert not missing, f"nodes without an example workflow: {missing}"
    assert not glob.glob(os.path.join(ROOT, "example_workflows", "*api*")), "API-format copies belong under tests/"


def test_nodes_are_registered_in_the_extension():
    registered = open(os.path.join(ROOT, "nodes", "__init__.py")).read()
    for schema in node_schemas():
        class_name = re.search(
            r"class (\w+)\(io\.ComfyNode\)", open(os.path.join(ROOT, "nodes", schema["file"])).read()
        ).group(1)
        assert class_name in registered, f"{class_name} is not in nodes.NODES"


def test_training_library_never_imports_the_host():
    for path in glob.glob(os.path.join(ROOT, "training", "*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                assert name.split(".")[0] not in {
                    "comfy",
                    "comfy_api",
                    "folder_paths",
                    "nodes",
                    "server",
                    "execution",
                }, f"{path} imports {name}"


def test_pack_imports_as_comfyui_loads_it_without_shadowing_nodes():
    """ComfyUI imports the pack by file path as a package; outside the host it must import cleanly,
    expose WEB_DIRECTORY, and must not have put the pack root on sys.path."""
    spec = importlib.util.spec_from_file_location(
        "vae_lab_pack_under_test", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    before = list(sys.path)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web" and os.path.isdir(os.path.join(ROOT, "web"))
    assert sys.path == before
    assert glob.glob(os.path.join(ROOT, "web", "*.js"))


def test_packaging_metadata():
    meta = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] == "vae-lab" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    with open(os.path.join(ROOT, "nodes", "common.py")) as f:
        assert f'VERSION = "{project["version"]}"' in f.read(), (
            "nodes/common.py VERSION (written into saved files) != pyproject"
        )
    assert set(project["dependencies"]) == {"torch", "safetensors", "numpy", "pillow", "lpips", "einops"}
    assert "Repository" in project["urls"]
    assert comfy["DisplayName"] == "VAE Lab" and comfy["PublisherId"] and comfy["Icon"]
    assert "GNU GENERAL PUBLIC LICENSE" in open(os.path.join(ROOT, "LICENSE")).read()
    requirements = [line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements.txt"))]
    for line in requirements:
        if line.lower().startswith(("torch", "torchvision")):
            assert re.fullmatch(r"torch(vision)?", line), f"requirements.txt must not pin {line}"
    assert not os.path.exists(os.path.join(ROOT, "setup.py")), "the pack is never pip-installed"


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "tools/test.sh" in readme and "tools/demo.sh" in readme
    assert re.search(r"^\s*(exec\s+)?bash tools/test\.sh\b", ci, re.MULTILINE)


def test_bundled_assets_have_provenance():
    assert os.path.isfile(os.path.join(ROOT, "assets", "taef2", "LICENSE"))
    sources = open(os.path.join(ROOT, "assets", "images", "SOURCES.md")).read()
    for path in glob.glob(os.path.join(ROOT, "assets", "images", "*")):
        if not path.endswith(".md"):
            assert os.path.basename(path) in sources, f"{path}: no provenance in SOURCES.md"


def test_every_import_in_the_library_resolves_also_the_ones_inside_functions():
    """Imports inside functions run only on their path (a relative one that points at the wrong package fails only
    when, say, Start Finetune Job runs in ComfyUI): every ``from .x import y`` in training/ must name a module that
    exists and a name it defines."""
    import importlib

    for path in glob.glob(os.path.join(ROOT, "training", "**", "*.py"), recursive=True):
        package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                module = importlib.import_module(target)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(f"{target}.{alias.name}"), (
                        f"{path}:{node.lineno}: {target} has no {alias.name}"
                    )
