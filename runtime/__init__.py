"""The Autonomite runtime process: settings, gateway, metrics, worker backends, LiveKit adapter."""
