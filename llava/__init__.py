"""ECSO: Eyes Closed, Safety On — inference-time protection for multimodal LLMs (LLaVA-1.5)."""
__version__ = "0.1.0"
