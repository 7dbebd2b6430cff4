"""Independent PyTorch reference implementations (SkipNet model, bias loss) used to cross-check the JAX/Flax code."""
