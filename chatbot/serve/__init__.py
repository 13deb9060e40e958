"""The chat service: websocket protocol v1, Redis sessions, cross-session batching, a web page.

``create_app`` builds the aiohttp application; ``chatbot serve`` runs it.  See docs/protocol.md.
"""

from chatbot.serve.app import create_app
from chatbot.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
