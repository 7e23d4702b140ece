"""llava-jp: small, high-resolution Japanese vision-language models (LLaVA family)."""

__version__ = "0.1.0"
