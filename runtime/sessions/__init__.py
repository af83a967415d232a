"""Session records: one per trigger, kept so an operator can bill and a client can look back.

Work in progress for issue 22 (not wired into the runtime yet): the record and its
embedded store. See runtime/sessions/store.py.
"""
