"""Sampling of the GLM-Image DiT: the pipeline's flow-matching schedule (`schedule`) and the jittable ODE /
SDE samplers with per-step log-probs, CFG, noise keys, i2i reference K/V and VAE decoding (`flow`)."""

from glm_jax.sampling.schedule import FlowSchedule, flow_schedule

__all__ = ["FlowSchedule", "flow_schedule"]
