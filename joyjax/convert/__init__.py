"""Checkpoint conversion: Hugging Face safetensors <-> joyjax params."""
