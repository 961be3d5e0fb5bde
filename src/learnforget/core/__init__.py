"""What every stage shares: atomic files, logs, checkpoint integrity, provenance, model cards, hub lookups, process settings."""
