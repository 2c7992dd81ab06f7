"""nasdsl: a search-space language and the DNAL supernet search.

Stages, each importing only those before it: language -> graph -> supernet -> search / derive ->
export; nasdsl.train (the training loop and data) serves the stages, and nasdsl.pipeline (a run)
and the command line sit above them all. The public API: `nasdsl.compile(space, **settings)`,
`nasdsl.build(network)`, `nasdsl.load(run_or_export_folder)`.
"""
from nasdsl._version import __version__  # noqa: F401 - the package version

_API = ("compile", "build", "load")


def __getattr__(name):
    """The API imports torch only when used: `import nasdsl` stays light."""
    if name in _API:
        from nasdsl import api
        return getattr(api, name)
    raise AttributeError(f"module 'nasdsl' has no attribute {name!r}")
