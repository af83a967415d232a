"""The program that runs inside one warm worker (a livekit-agents AgentServer)."""
