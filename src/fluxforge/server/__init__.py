"""`fluxforge serve`: the HTTP API (shared/SERVING.md) over one `Pipeline`. FastAPI and uvicorn are imported
only here, so the library and the CLI's other commands do not need them loaded."""

from fluxforge.server.app import Service, Settings, create_app

__all__ = ["Service", "Settings", "create_app"]
