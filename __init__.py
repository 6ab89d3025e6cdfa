"""VAE Lab: load, compare and finetune VAE decoders in ComfyUI.

ComfyUI imports this file by path as a package, so everything below uses relative imports. Outside
ComfyUI (tests, the standalone demo) the ``training`` library is used on its own and this file only
names the web folder.
"""

WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
