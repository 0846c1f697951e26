"""fedtune.compliance"""
