"""moetier: fast Mixture-of-Experts inference from Hugging Face checkpoints."""

from moetier.errors import MoetierError
from moetier.llm import LLM
from moetier.sampling_params import SamplingParams

__all__ = ["LLM", "MoetierError", "SamplingParams"]
__version__ = "0.1.0"
