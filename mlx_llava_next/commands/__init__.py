"""The CLI's commands, one module per group. Each module has `register(app)`."""

import importlib

MODULES = ["generate", "convert", "parity", "bench", "serve"]


def register_all(app) -> None:
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command group not built yet
            raise
        module.register(app)
