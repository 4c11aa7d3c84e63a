"""Member models: one architecture family per file, loaders and the zoo."""
