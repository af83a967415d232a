"""The LiveKit adapter: server API calls with a client's own credentials, webhook
verification, and the handoff that puts an agent in a room."""
