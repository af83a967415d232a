"""Developer tools: a loopback livekit-server, the worker image builder, and the chat and
voice clients used by the demo, the tests and the benchmarks.

Production code imports nothing from here (tests/unit/test_layers.py checks it); only the
CLI's developer parts (``chat``, ``image build``, ``serve --with-livekit``) load it, when
they run.
"""
