"""Finetuning and base pretraining: the loop, methods, optimisers, schedules, FSDP, launch, accounting and the keep policy."""
