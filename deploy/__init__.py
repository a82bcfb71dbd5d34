"""Deployment: the local Prefect server (serve) and the HPC (Slurm) route. Imports Prefect; the library never does."""
