"""fedtune.coordinator"""

if __name__ != "fedtune.coordinator":  # imported by a top-level name: the repository root is on sys.path
    raise ModuleNotFoundError(f"No module named {__name__!r}: this folder is fedtune.coordinator; import that "
                              "(the repository root on sys.path would shadow installed packages)", name=__name__)
