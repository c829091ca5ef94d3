"""Continuous training: new event partitions -> challenger -> gate -> registry -> canary -> production."""

from recforge.pipeline.runner import STEPS, abandon, run
from recforge.pipeline.settings import PipelineConfig, load_pipeline

__all__ = ["STEPS", "PipelineConfig", "abandon", "load_pipeline", "run"]
