"""Session records: one per trigger, kept so an operator can bill and a client can look back.

- ``store``: the embedded SQLite store (WAL, in ``runtime.state_dir``), always there;
- ``log``: the session log, which the dispatcher, the gateway and the pools tell what
  happens, and whose one thread writes the records;
- ``shipper``: with clients in Supabase, the records go on to its ``sessions`` table;
- ``webhooks``: signed ``session.started`` / ``session.ended`` events to each client.
"""
