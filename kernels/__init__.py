"""fedtune.kernels"""
