"""Cluster resources: the GPU memory planner and each job's resources."""
