"""tinyaccel."""
