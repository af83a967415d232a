"""The HTTP layer: the gateway's routes, its guard and models, the OpenAPI document, the
metrics listener, the bridge from asyncio to the actors, and the listening sockets.

Only this package knows aiohttp's request and response types. It reaches the rest of the
runtime through :class:`runtime.http.service.Service`, so it imports nothing from the
process's composition root (``runtime/server``).
"""
