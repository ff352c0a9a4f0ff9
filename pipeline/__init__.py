"""gft-pipeline: the library. Every stage of SFT -> GFT -> GRPO -> evaluation as plain Python calls."""

__version__ = "0.1.0"
