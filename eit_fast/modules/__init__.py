"""Drop-in fused modules: same parameters and names as the reference modules they replace."""
