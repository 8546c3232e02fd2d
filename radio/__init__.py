"""Endless Radio: the asyncio service around the engine (stations, clock, outputs, API, CLI)."""
