"""Models built from xmoe layers."""

from .gpt import GPT, GPTConfig, GPTOutput, MoEConfig, routing_summary

__all__ = ["GPT", "GPTConfig", "GPTOutput", "MoEConfig", "routing_summary"]
