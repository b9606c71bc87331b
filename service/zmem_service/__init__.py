"""zmem service: a nearest-neighbour memory of RL episodes, served over HTTP."""

from zmem_core import __version__

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so `import zmem_service` (e.g. for the CLI) doesn't import FastAPI and FAISS.
    if name == "create_app":
        from .http.app import create_app

        return create_app
    raise AttributeError(name)
