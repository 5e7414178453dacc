"""A plugin whose import fails, as one with a missing or incompatible library would."""

raise RuntimeError("broken on purpose")
