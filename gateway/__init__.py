"""wsgateway: WebSocket gateway replicas fanning out Redis pub/sub messages to clients."""

__version__ = "0.1.0"
