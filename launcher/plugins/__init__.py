"""The loop's built-in plug-ins (``launcher/events.py``); importing this package registers them.

A new phase or algorithm: a module here with a ``@register_plugin`` factory, imported below.
"""

from launcher.plugins import suptickets  # noqa: F401

__all__ = ["suptickets"]
