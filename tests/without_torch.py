"""Run a module as __main__ in a Python where torch, diffusers, transformers and optimum cannot be imported.

    python tests/without_torch.py edge_ti train ...      # the CLI
    python tests/without_torch.py script.py ...          # a script
"""
import importlib.abc
import runpy
import sys

BLOCKED = ("torch", "diffusers", "transformers", "optimum", "edge_ti_export")


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the edge-ti runtime must not import it")
        return None


sys.meta_path.insert(0, _Block())
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
