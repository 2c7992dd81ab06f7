"""The small public Python API (`nasdsl.compile`, `nasdsl.build`, `nasdsl.load`), for notebooks and the
benchmarks: the same objects the command line works with, without a run folder."""
from __future__ import annotations

from pathlib import Path

from nasdsl.graph.ir import Network


def compile(space_path: str | Path, **settings) -> Network:  # noqa: A001 - the verb users expect
    """Compile a `.space` file to its graph; `settings` are its parameters, as `--set` gives them
    (`nasdsl.compile("spaces/resnet56_cifar.space", depth=3, width=0.5)`)."""
    from nasdsl.language.compiler import compile_source
    from nasdsl.language.source import read_source

    return compile_source(read_source(space_path), str(space_path), {k: str(v) for k, v in settings.items()})


def build(network: Network):
    """The plain PyTorch network of a graph (no gates), with fresh weights."""
    from nasdsl.supernet.network import NasNet

    return NasNet(network.to_config())


def load(path: str | Path):
    """The derived network of a run folder or an export folder, or the plain network of an import
    folder (`nasdsl import`), with its weights."""
    from nasdsl.export.load import load as load_export
    from nasdsl.importer import MARKER, load_import

    if (Path(path) / MARKER).is_file():
        return load_import(path)

    return load_export(path)
