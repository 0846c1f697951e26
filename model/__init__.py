"""fedtune.model"""
