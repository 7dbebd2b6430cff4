"""SkipNet and Bias Loss (Abrahamyan et al., ICCV 2021) in JAX/Flax."""

__version__ = "0.1.0"
