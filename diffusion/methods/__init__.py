"""The methods, each one file implementing `diffusion.methods.base.Method` and registered under
its config name. Importing this package registers them all."""

from diffusion.methods import autoregressive, ddpm, embedding, masked  # noqa: F401 (registers them)
from diffusion.methods.base import METHODS, Method, Progress, build_method, no_progress, register

__all__ = ["METHODS", "Method", "Progress", "build_method", "no_progress", "register"]
