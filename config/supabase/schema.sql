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
