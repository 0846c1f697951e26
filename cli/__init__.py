"""fedtune.cli"""
