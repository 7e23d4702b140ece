"""The model itself: exactly the remote code a release ships (imports nothing else from llava_jp)."""

from .configuration import LlavaJpConfig
from .modeling import LlavaJpForConditionalGeneration, LlavaJpModel
from .processing import LlavaJpProcessor

__all__ = ["LlavaJpConfig", "LlavaJpForConditionalGeneration", "LlavaJpModel", "LlavaJpProcessor"]
