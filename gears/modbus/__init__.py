"""Modbus TCP devices into a Unified Namespace: register decoding (``codec``), the request
planner (``planner``), settings and UNS names (``settings``), and what a tag publishes
(``sample``) — sans-I/O cores; the poller gear is their asyncio shell."""
