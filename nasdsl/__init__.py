"""nasdsl: a search-space language and the DNAL supernet search.

Stages, each importing only those before it: language -> graph -> supernet -> search / derive ->
export; nasdsl.train (the training loop and data) serves the stages, and nasdsl.pipeline (a run)
and the command line sit above them all. The public API: `nasdsl.compile(space, **settings)`,
`nasdsl.build(network)`, `nasdsl.load(run_or_export_folder)`.
"""
import os as _os

from nasdsl._version import __version__  # noqa: F401 - the package version

# oneDNN (torch's CPU convolutions) caches 1024 compiled conv kernels by default, one per shape and
# pass. A derived network whose every candidate block kept its own widths has some 400 conv shapes,
# 1,200 kernels with the two backward passes: at 1024 the cache thrashes and every step recompiles,
# which made finetuning a 3x smaller network 1.9x slower per step than its supernet (1228 ms against
# 656; 344 ms with room for 4096). Read when the first conv runs; a value the user set is kept.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

_API = ("compile", "build", "load")


def __getattr__(name):
    """The API imports torch only when used: `import nasdsl` stays light."""
    if name in _API:
        from nasdsl import api
        return getattr(api, name)
    raise AttributeError(f"module 'nasdsl' has no attribute {name!r}")
