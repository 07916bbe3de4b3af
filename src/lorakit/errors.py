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


# No advice about data-loader workers: lorakit builds batches in the training process itself (no
# kohya-style DataLoader workers, whose spawned copies multiply the memory used on Windows).

# Windows: "The paging file is too small for this operation to complete" (ERROR_COMMITMENT_LIMIT)
WINERROR_PAGING_FILE = 1455

PAGING_FILE_ADVICE = (
    "Windows ran out of virtual memory (the paging file is too small) while {doing}. Loading a "
    "Stable Diffusion model briefly needs its whole size in RAM + page file. Fix: System Properties > "
    "Advanced > Performance Settings > Advanced > Virtual memory > Change: 'System managed size' "
    "on a drive with 30+ GB free (or a custom size of at least 32768 MB), then restart; close other "
    "programs; use cache_latents = true."
)
RAM_ADVICE = (
    "the computer ran out of memory (RAM) while {doing}. Close other programs, use cache_latents = "
    "true (on disk: cache_latents_to_disk = true), and on Windows give the paging file more room."
)
GPU_ADVICE = (
    "out of GPU memory while {doing}. Try train_batch_size = 1, gradient_checkpointing = true, "
    "cache_latents = true, mixed_precision = 'bf16' or 'fp16', a smaller resolution, or close other "
    "programs using the GPU (a browser, a second UI). On Windows, the NVIDIA driver's 'CUDA - Sysmem "
    "Fallback Policy' set to 'Prefer No Sysmem Fallback' turns a silent 10x slowdown into this error."
)


def explain_memory_error(e: BaseException, doing: str = "working") -> str | None:
    """Advice for an out-of-memory error of any kind (RAM, page file, GPU); None for other errors."""
    if isinstance(e, OSError) and getattr(e, "winerror", None) == WINERROR_PAGING_FILE:
        return PAGING_FILE_ADVICE.format(doing=doing)
    if isinstance(e, OSError) and "paging file is too small" in str(e).lower():
        return PAGING_FILE_ADVICE.format(doing=doing)
    if isinstance(e, MemoryError):
        return RAM_ADVICE.format(doing=doing)
    name = type(e).__name__
    if name == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        return GPU_ADVICE.format(doing=doing)
    return None
