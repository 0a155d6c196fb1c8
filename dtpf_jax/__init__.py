"""dtpf_jax: JAX/Flax reimplementation of DTPF (text-prior distillation for image fusion)."""

__version__ = "0.1.0"
