"""Reinforcement learning: the batched sampler, tasks and rewards, the prompt stream (see ARCHITECTURE.md)."""
