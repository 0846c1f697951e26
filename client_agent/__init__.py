"""fedtune.client_agent"""

if __name__ != "fedtune.client_agent":  # imported by a top-level name: the repository root is on sys.path
    raise ModuleNotFoundError(f"No module named {__name__!r}: this folder is fedtune.client_agent; import that "
                              "(the repository root on sys.path would shadow installed packages)", name=__name__)
