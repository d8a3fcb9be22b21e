"""Sample calls of the nerf ops (format: tests/_examples.py)."""
