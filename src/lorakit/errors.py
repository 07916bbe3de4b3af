"""User-facing errors: each names the file or field at fault and says what to do."""


class LoraKitError(Exception):
    """An error caused by the user's input. The CLI prints it without a traceback."""


class ConfigError(LoraKitError):
    """A config key or value is wrong."""


class DatasetError(LoraKitError):
    """An image folder, caption or image is wrong."""


class ModelError(LoraKitError):
    """A base model or LoRA file is missing, unsafe or of the wrong kind."""


class TrainingError(LoraKitError):
    """Training cannot go on (NaN loss, out of memory)."""


class GenerationError(LoraKitError):
    """An image cannot be drawn as asked (the model produced NaN or infinite values)."""
