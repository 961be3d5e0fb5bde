"""Composing adapters (LoRAHub)."""
