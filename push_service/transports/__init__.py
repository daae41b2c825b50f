"""Transports move frames between a socket and a Session; they hold no Phoenix logic."""
