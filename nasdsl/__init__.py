"""nasdsl: a search-space language and the DNAL supernet search.

Pipeline, one package per stage: language -> graph -> supernet -> search -> derive -> export.
"""
__version__ = "0.1.0"


def __getattr__(name):
    """`nasdsl.load` imports torch only when used: `import nasdsl` stays light."""
    if name == "load":
        from nasdsl.export.load import load
        return load
    raise AttributeError(f"module 'nasdsl' has no attribute {name!r}")
