"""supabase-py as the runtime calls it: one attempt per call, bounded, and the HTTP status
of the last answer kept beside it.

Two parts talk to the same Supabase project, each on a thread of its own and each with a
client of its own (none is shared between threads): the clients watcher
(``runtime/clients/store.py``) and the session shipper (``runtime/sessions/shipper.py``).
They sit in one layer and may not import each other, so what both need lives here.

Why the status is kept: supabase-py's ``APIError`` carries PostgREST's code but drops the
HTTP status, and only the status tells a gateway's refusal (401, any body) or a proxy's
502 from a refusal of the rows themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx  # imported when a client is made: only a Supabase source needs it

CALL_TIMEOUT_S = 10.0
# PostgREST's codes for a key or role that may not read the table: insufficient privilege
# (the anon key), and a JWT that is invalid, missing or whose claims fail.
REFUSAL_CODES = frozenset({"42501", "PGRST301", "PGRST302", "PGRST303"})


class SupabaseApi:
    """A supabase-py client (PostgREST under ``{url}/rest/v1``) and the status of its last answer.

    One attempt per call, bounded by ``timeout_s``: the caller's own loop is the retry
    (supabase-py's backoff of 1 + 2 + 4 s would only hide an outage). Owned by one
    thread: ``status`` is that thread's last answer.
    """

    def __init__(self, url: str, key: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        import httpx
        from supabase import create_client  # imported only when used
        from supabase.lib.client_options import SyncClientOptions

        self.status: int | None = None  # of the last answer: supabase-py's errors drop it
        self._http = httpx.Client(timeout=timeout_s, event_hooks={"response": [self._answered]})
        options = SyncClientOptions(httpx_client=self._http, postgrest_client_retry=False)
        self.client = create_client(url, key, options)

    def _answered(self, response: httpx.Response) -> None:
        self.status = response.status_code

    def table(self, name: str) -> Any:
        """A query on ``name``, with the last status forgotten: what ``status`` holds after
        it runs is that query's answer, or None if none came (a timeout, a refused connection)."""
        self.status = None
        return self.client.table(name)

    def close(self) -> None:
        self._http.close()


def refused(status: int | None, code: str | None) -> bool:
    """An answer that says the key may not read the table (a gateway's 401 or 403, whatever
    its body; PostgREST's own codes for a bad JWT or a role without the grant)."""
    return status in (401, 403) or code in REFUSAL_CODES
