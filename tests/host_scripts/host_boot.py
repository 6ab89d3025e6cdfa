"""What every host script does first: ComfyUI's code importable on the CPU, then this pack imported the way
ComfyUI imports a custom node (a package from its ``__init__.py`` named ``vae_lab``, never the folder on
sys.path, whose ``nodes/`` would shadow ComfyUI's ``nodes.py``)."""

from __future__ import annotations

import importlib.util
import os
import sys

PACK = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def boot(comfy_dir: str):
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401  (before nodes: see HOST.md)

    import nodes  # noqa: F401  (ComfyUI's nodes.py, loaded before the pack)

    spec = importlib.util.spec_from_file_location(
        "vae_lab", os.path.join(PACK, "__init__.py"), submodule_search_locations=[PACK]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["vae_lab"] = pack
    spec.loader.exec_module(pack)
    return pack
