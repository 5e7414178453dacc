"""Built-in plugins, one backend a module, registered through entry points."""
