"""The Autonomite runtime process.

Its modules sit in layers; each imports only from the layers below it
(tests/unit/test_layers.py checks this):

- ``runtime`` itself: the foundation every other part uses (settings, metrics, secrets,
  errors, isolation, cgroups, the instance id, the drain policy, the Supabase client);
- ``runtime.backends``, ``runtime.livekit``, ``runtime.clients``, ``runtime.sessions``:
  where workers run, how LiveKit is called, where clients come from, where every session
  is recorded (and sent on: to Supabase, and to each client's webhook);
- ``actors`` (a sibling package): the supervised tree of pools, scaler and dispatcher;
- ``runtime.http``: the gateway and the metrics listener;
- ``runtime.server``: the composition root and the command line;
- ``runtime.dev``: developer tools, loaded only by the CLI's developer commands.
"""
