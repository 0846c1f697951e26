"""fedtune.coordinator"""
