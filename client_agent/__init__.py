"""fedtune.client_agent"""
