-- Autonomite's clients, as a Supabase project keeps them. Apply once (SQL editor or psql).
--
-- One row per client company, the same fields as a client in the YAML config
-- (README: Configuration). The runtime reads the table with the service_role key and
-- validates every row with the same models as a YAML client; a bad row is skipped and
-- reported, never applied.
--
-- Secrets (api_token, livekit_api_secret, provider keys inside agents) sit in columns that
-- only service_role can read: row-level security is on and no policy grants anon or
-- authenticated anything. In production, prefer Supabase Vault for them.

create table if not exists public.clients (
    id                 text primary key check (id ~ '^[a-z0-9][a-z0-9_-]{0,31}$'),
    name               text not null,
    api_token          text not null,
    livekit_url        text not null,
    livekit_api_key    text not null,
    livekit_api_secret text not null,
    pool               jsonb not null default '{}'::jsonb,  -- {min_idle, max_size, cpu, memory_mb}
    image              text,                                 -- docker backend: this client's image
    knowledge_dir      text,                                 -- RAG documents, on the runtime's host
    agents             jsonb not null,                       -- [{name, system_prompt, enable_rag, voice_id, llm, stt, tts, end_of_turn_s}]
    active             boolean not null default true,        -- false: the client's pool drains
    updated_at         timestamptz not null default now()
);

create or replace function public.clients_touch() returns trigger
language plpgsql as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

drop trigger if exists clients_touch on public.clients;
create trigger clients_touch before update on public.clients
    for each row execute function public.clients_touch();

-- The runtime reads only rows changed since its last read (runtime/clients/changes.py).
create index if not exists clients_updated_at on public.clients (updated_at);

-- One NOTIFY per changed row, naming it: a runtime configured with the database URL reads
-- that row at once instead of waiting for its next poll (a truncate names none: the
-- runtime's periodic resync finds what went).
create or replace function public.clients_notify() returns trigger
language plpgsql as $$
begin
    if tg_level = 'STATEMENT' then
        perform pg_notify('autonomite_clients', '');
    elsif tg_op = 'DELETE' then
        perform pg_notify('autonomite_clients', old.id);
    else
        perform pg_notify('autonomite_clients', new.id);
    end if;
    return null;
end;
$$;

drop trigger if exists clients_notify on public.clients;
create trigger clients_notify after insert or update or delete on public.clients
    for each row execute function public.clients_notify();
drop trigger if exists clients_notify_truncate on public.clients;
create trigger clients_notify_truncate after truncate on public.clients
    for each statement execute function public.clients_notify();

alter table public.clients enable row level security;
-- No policy for anon or authenticated: they see nothing. service_role bypasses RLS.
revoke all on public.clients from anon, authenticated;
grant select, insert, update, delete on public.clients to service_role;

-- A client's webhook, {url, secret}: where the runtime posts that client's session events.
-- Its secret signs them, so it is a secret like api_token: only service_role reads this
-- table (above). Added by alter, so a project that applied an older copy of this file
-- gains it by running the file again.
alter table public.clients add column if not exists webhook jsonb;  -- {url, secret}, or null: no webhook

-- Session records, one row per trigger, as the runtime keeps them in its embedded SQLite
-- store (runtime/sessions/store.py) and ships them here (runtime/sessions/shipper.py):
-- SQLite is the outage buffer, this table the copy an operator bills and reports from.
-- The shipper upserts whole rows by id, so a row sent twice (after a timeout, a restart)
-- is the same row. Times are UTC; null: not known (yet). No secret and no email in clear:
-- user_hash is the end user's participant identity, a hash.
create table if not exists public.sessions (
    id             text primary key,
    client         text not null,
    agent          text,
    room           text,
    worker_id      text,
    backend        text,
    livekit_url    text,                 -- the LiveKit project's URL only, never its keys
    user_hash      text,
    status         integer,              -- the trigger's HTTP answer
    error          text,                 -- its error code, if refused
    end_cause      text check (end_cause in ('user_left', 'room_finished', 'no_show', 'room_deleted',
                                             'worker_failed', 'drained', 'runtime_restart')),  -- EndCause
    received_at    timestamptz,
    answered_at    timestamptz,
    joined_at      timestamptz,          -- the agent joined the room
    user_joined_at timestamptz,          -- the first end user did
    ended_at       timestamptz,
    updated_at     timestamptz not null default now()
);

-- The same touch as clients': updated_at says when a row last arrived.
drop trigger if exists sessions_touch on public.sessions;
create trigger sessions_touch before update on public.sessions
    for each row execute function public.clients_touch();

-- History and usage per client read by time received, as in SQLite.
create index if not exists sessions_client_received on public.sessions (client, received_at);

-- Rooms, worker ids and callers' hashes are one client's business and nobody else's: RLS
-- on and no policy, so anon and authenticated see nothing (a client-facing view would be
-- a policy of its own, per client). The runtime writes with the service_role key, which
-- bypasses RLS; it never deletes (retention is the operator's choice).
alter table public.sessions enable row level security;
revoke all on public.sessions from anon, authenticated;
grant select, insert, update on public.sessions to service_role;
