"""Preprocessing that runs once, before the denoiser loads: upscaling small images, captioning
images without captions, and finding the subject (masks). Each model lives in its own module and
maps PIL images to PIL images or strings; `subject.py` decides which images need what, splits the
work between processes and caches the results."""
