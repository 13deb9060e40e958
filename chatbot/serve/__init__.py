"""The chat service: websocket protocol v1, Redis sessions, cross-session batching, a web page.

``chatbot.serve.app.create_app`` builds the aiohttp application; ``chatbot serve`` runs it.  Modules:
``protocol`` (frames, validation, error codes), ``sessions`` (Redis store), ``redis_backend`` (embedded or
external Redis), ``batcher`` (cross-session batching off the event loop), ``connection`` (one websocket),
``metrics``, ``ratelimit``, ``state`` (typed app keys), ``static/`` (the page).  See docs/protocol.md.
"""
