"""joyjax: a JAX/Flax trainer for JoyAI-LLM Flash / DeepSeek-V3-class Mixture-of-Experts models."""

__version__ = "0.1.0"
