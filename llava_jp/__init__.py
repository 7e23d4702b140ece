"""llava-jp: small, high-resolution Japanese vision-language models (LLaVA family)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .core import LlavaJpConfig, LlavaJpForConditionalGeneration, LlavaJpModel, LlavaJpProcessor

__version__ = "0.1.0"

AutoConfig.register(LlavaJpConfig.model_type, LlavaJpConfig, exist_ok=True)
AutoModel.register(LlavaJpConfig, LlavaJpModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaJpConfig, LlavaJpForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavaJpConfig, LlavaJpProcessor, exist_ok=True)

__all__ = ["LlavaJpConfig", "LlavaJpForConditionalGeneration", "LlavaJpModel", "LlavaJpProcessor", "__version__"]
