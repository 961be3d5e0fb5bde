"""The study: its config (schema, validation, expansion into runs) and the config reference."""
