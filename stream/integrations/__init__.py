"""Clients of the service for the frameworks voice agents are built with, as optional extras.

Each speaks only the public HTTP, websocket and WebRTC API, as any third party would.
"""
