"""push-service: a stateless real-time push service speaking the Phoenix Channels protocol."""

__version__ = "0.1.0"
