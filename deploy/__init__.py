"""Deployment helpers (many workers, GPUs): arrives with the deployment issue."""
