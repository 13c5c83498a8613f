"""rlhfkit's built-in plugins, each registered through the ``rlhfkit`` entry-point group
exactly as a third-party plugin is."""
