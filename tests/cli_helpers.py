"""What the end-to-end tests share: the tiny two-candidate space and `nasdsl` run as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys

#: one thread per test process (they run beside each other on 2 cores), unbuffered for kill tests
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

def tiny_space(width: int = 8, expansion: int = 2) -> str:
    """A stem, a layer of two MBConv candidates `width` wide, a gated conv twice as wide and the
    classifier: every stage in seconds."""
    return f"""
space tiny(input=3, resolution=8, classes=10)
layer stem [gate=off] = conv(8, k=3) > bn > relu
layer choice = mbconv({width}, k=3, e={expansion}) | mbconv({width}, k=5, e={expansion})
layer down = conv({2 * width}, k=3, stride=2) > bn > relu
layer classifier = gap > linear(classes)
"""


TINY = tiny_space()


def run_nasdsl(*args, check: bool = True, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    """`python -m nasdsl ARGS` in a fresh process; with `check`, a non-zero exit fails with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "nasdsl", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def distinct_bn(model, generator=None):
    """Gives every BN of `model` random statistics and affine parameters (in place), so a comparison
    of two networks' outputs depends on every BN being where it should be. Returns the model."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
    return model


def contiguous_maps(model, x, names) -> list[str]:
    """Which of the modules `names` of `model` return a contiguous (NCHW) map in a forward of x in
    the model's mode (one-channel and one-pixel maps are both formats at once and not counted): in a
    channels-last network each conv after one reorders it."""
    found: list[str] = []

    def hook(name):
        def check(module, inputs, out):
            if out.dim() == 4 and out.size(1) > 1 and out.size(2) * out.size(3) > 1 and out.is_contiguous():
                found.append(name)
        return check

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    model(x)
    for h in hooks:
        h.remove()
    return found
