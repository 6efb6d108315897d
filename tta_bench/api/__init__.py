"""What a plugin author touches: the Method and Task base classes, typed parameters, the registry
(`register_method`, `register_task`, `register_model`) and the one user-facing error type."""
