"""Offline captioning with the user's own model folder: a WD14 tagger (model.onnx + selected_tags.csv,
run with onnxruntime) or a transformers image-to-text model (BLIP, GIT, ...). Nothing is downloaded."""

from .run import CaptionReport, caption_folder, find_images, load_captioner

__all__ = ["CaptionReport", "caption_folder", "find_images", "load_captioner"]
