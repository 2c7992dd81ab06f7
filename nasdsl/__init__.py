"""nasdsl: a search-space language and the DNAL supernet search.

Pipeline, one package per stage: language -> graph -> supernet -> search -> derive -> export.
"""
__version__ = "0.1.0"
