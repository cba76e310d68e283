"""vistune's built-in features, written as ordinary plugins and loaded through the
``vistune`` entry points declared in vistune's own pyproject.toml."""
