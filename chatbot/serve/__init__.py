"""The chat service: websocket protocol v1, Redis sessions, cross-session batching, a web page.

``chatbot.serve.app.create_app`` builds the aiohttp application; ``chatbot serve`` runs it.  Modules:
``protocol`` (frames, validation, error codes; shared with ``chatbot.client``), ``sessions`` (Redis
store, generation claims, health check), ``redis_backend`` (embedded or external Redis), ``batcher``
(cross-session batching off the event loop), ``replies`` (the reply service: sessions, limits,
batching, error translation), ``connection`` (one websocket: frames in, frames out), ``metrics``,
``ratelimit``, ``state`` (typed app keys), ``static/`` (the page, its script and styles).  See
docs/protocol.md.
"""
