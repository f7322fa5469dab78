"""Async ML prediction service: Starlette + aio-pika on one event loop."""
