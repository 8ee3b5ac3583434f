"""What happens in a running node, as one resumable stream (see :mod:`backer.events.bus`)."""

from backer.events.bus import Event, EventBus, EventType, paths

__all__ = ["Event", "EventBus", "EventType", "paths"]
