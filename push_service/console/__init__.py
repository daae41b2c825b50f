"""The live web console (`GET /console`) and the JSON endpoints it reads."""

from push_service.console.routes import setup

__all__ = ["setup"]
