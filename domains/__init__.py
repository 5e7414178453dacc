"""Built-in domain plugins: each subpackage holds a pack and registers it."""
