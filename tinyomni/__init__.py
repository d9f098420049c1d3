"""tinyomni: small omni-modal language models (text, images, video, speech → text) on a laptop CPU."""

from tinyomni.api import Model, load, tiny_random_model
from tinyomni.config import AudioConfig, DecoderConfig, OmniConfig, ProjectorConfig, VisionConfig
from tinyomni.errors import CheckpointError, ConfigError, ContextLengthError, InputError, TinyOmniError

__version__ = "0.1.0"
__all__ = [
    "AudioConfig", "CheckpointError", "ConfigError", "ContextLengthError", "DecoderConfig", "InputError",
    "Model", "OmniConfig", "ProjectorConfig", "TinyOmniError", "VisionConfig", "load", "tiny_random_model",
]
