"""The write side: command models and the handlers that turn them into stored events."""
