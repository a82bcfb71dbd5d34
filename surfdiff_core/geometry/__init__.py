"""Batched slab geometry shared by the networks, the diffusion process and the relaxers (no ML, no SDE)."""
